"""Broken model folders give one line saying what is wrong and what to do (ModelLoadError), at load and from
the command line; a manifest makes a changed byte in the weights refused at load; saved configs carry no
local folders."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch

from metalm.data.tokenizer_check import check_tokenizer
from metalm.model.loading import MANIFEST, ModelLoadError, check_model_folder, write_manifest
from metalm.serving.cli import main
from metalm.serving.engine import Engine
from tests.conftest import TINY_BERT, TINY_LLAMA, tiny_recipe


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """A tiny MetaLM saved as a run's final/ is: weights, processor, manifest."""
    torch.manual_seed(0)
    model, processor = tiny_recipe().build()
    folder = tmp_path_factory.mktemp("model") / "final"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    write_manifest(folder, step=0)
    return folder


def copy_of(saved: Path, tmp_path: Path, manifest: bool = True) -> Path:
    folder = tmp_path / "final"
    shutil.copytree(saved, folder)
    if not manifest:
        (folder / MANIFEST).unlink()
    return folder


def data_start(weights: Path) -> int:
    """Offset of the first tensor byte (after the 8-byte length and the JSON header)."""
    (n,) = struct.unpack("<Q", weights.read_bytes()[:8])
    return 8 + n


def truncate(folder: Path) -> None:
    w = folder / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])


def corrupt_header(folder: Path) -> None:
    w = folder / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[8:20] = b"X" * 12
    w.write_bytes(bytes(data))


def flip_weight_byte(folder: Path) -> None:
    w = folder / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[data_start(w) + 1000] ^= 0x40  # inside the tensors: the file still parses
    w.write_bytes(bytes(data))


def truncate_config(folder: Path) -> None:
    c = folder / "config.json"
    c.write_text(c.read_text()[:300])


def drop_text_config(folder: Path) -> None:
    c = folder / "config.json"
    config = json.loads(c.read_text())
    del config["text_config"]
    c.write_text(json.dumps(config))


DAMAGE = {
    "truncated": (truncate, r"model\.safetensors is truncated \(expected \d+ bytes, found \d+\)"),
    "header": (corrupt_header, r"model\.safetensors has a corrupt header"),
    "flipped": (flip_weight_byte, r"model\.safetensors does not match its sha256 in the manifest"),
    "config-json": (truncate_config, r"config\.json is not valid JSON"),
    "config-content": (drop_text_config, r"config\.json: MetaLMConfig needs `text_config`"),
}


def test_a_good_folder_with_its_manifest_loads(saved):
    from transformers import AutoModelForCausalLM

    import metalm  # noqa: F401  (registers the Auto classes)

    check_model_folder(saved)
    assert AutoModelForCausalLM.from_pretrained(saved) is not None


@pytest.mark.parametrize("damage", ["truncated", "header", "flipped", "config-content"])
def test_broken_folder_is_one_line_at_load(saved, tmp_path, damage):
    from transformers import AutoModelForCausalLM

    from metalm import MetaLMForCausalLM

    apply, message = DAMAGE[damage]
    folder = copy_of(saved, tmp_path)
    apply(folder)
    loaders = [MetaLMForCausalLM.from_pretrained]
    if damage != "config-content":  # transformers reads config.json itself before MetaLM code runs
        loaders.append(AutoModelForCausalLM.from_pretrained)
    for load in loaders:
        with pytest.raises(ModelLoadError, match=message) as info:
            load(folder)
        assert "\n" not in str(info.value)
        assert "re-save the model" in str(info.value)  # what to do


def test_flipped_byte_without_a_manifest_is_not_detectable(saved, tmp_path):
    """Why final/ gets a manifest: without one, a changed byte in the tensors loads."""
    folder = copy_of(saved, tmp_path, manifest=False)
    flip_weight_byte(folder)
    check_model_folder(folder)


def test_a_manifest_without_the_weights_does_not_verify(saved, tmp_path):
    folder = copy_of(saved, tmp_path)
    manifest = json.loads((folder / MANIFEST).read_text())
    del manifest["files"]["model.safetensors"]
    (folder / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ModelLoadError, match="model.safetensors is not in the manifest"):
        check_model_folder(folder)


@pytest.mark.parametrize("damage", sorted(DAMAGE))
@pytest.mark.parametrize("command", ["generate", "eval"])
def test_cli_prints_one_line_and_fails(saved, tmp_path, capsys, damage, command):
    from metalm.cli import main

    apply, message = DAMAGE[damage]
    folder = copy_of(saved, tmp_path)
    apply(folder)
    if command == "generate":
        argv = ["generate", "--model", str(folder), "--prompt", "hello", "--max-new-tokens", "1"]
    else:
        argv = ["eval", str(folder), "--task", "bbc-topic", "--limit", "1", "--out", str(tmp_path / "e")]
    assert main(argv) != 0
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert f"metalm {command}: error: " in err
    assert str(folder) in err
    import re

    assert re.search(message, err), err


def test_saved_config_has_no_local_paths(tmp_path):
    """Parts loaded from local folders (an encoder here, the decoder through init_from) leave no path of
    this machine in a saved config.json."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    from metalm import EncoderRecipe, MetaLMForCausalLM, ModelRecipe

    bert = tmp_path / "local-bert"
    AutoModel.from_config(AutoConfig.for_model(**TINY_BERT)).save_pretrained(bert)
    llama = tmp_path / "local-llama"
    AutoModelForCausalLM.from_config(AutoConfig.for_model(**TINY_LLAMA)).save_pretrained(llama)
    recipe = ModelRecipe(
        decoder=str(llama),
        tokenizer="packaged:minilm-l6",
        encoders=[EncoderRecipe("text", "text", source=str(bert), tokenizer="decoder")],
    )
    model, _ = recipe.build()
    model.save_pretrained(tmp_path / "a")
    # Loaded from a folder and saved again (init_from, finetuning): the load path must not stick either.
    MetaLMForCausalLM.from_pretrained(tmp_path / "a").save_pretrained(tmp_path / "b")
    for name in ("a", "b"):
        text = (tmp_path / name / "config.json").read_text()
        assert str(tmp_path) not in text, name
        assert "/tmp" not in text and "/home" not in text and "/work" not in text, name
        assert "_name_or_path" not in text
    config = json.loads((tmp_path / "b" / "config.json").read_text())
    assert config["encoders"][0]["initialized_from"] == "local-bert"  # the folder's name stays, as a hint


def test_train_with_a_broken_init_from_is_one_line(saved, tmp_path):
    import yaml

    from metalm.training.cli import train_main

    folder = copy_of(saved, tmp_path)
    truncate(folder)
    cfg = {
        "init_from": str(folder),
        "data": {"streams": [{"source": "pydoc"}], "seq_len": 32, "max_records": 8},
        "optim": {"max_steps": 1, "batch_size": 2},
        "run": {"output_dir": str(tmp_path / "run"), "tensorboard": False},
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(SystemExit) as info:  # `metalm train` exits with status 1 and this line
        train_main(str(tmp_path / "c.yaml"), [])
    message = str(info.value.code)
    assert message.startswith(f"error: {folder}/model.safetensors is truncated") and "\n" not in message


# --- a folder whose tokenizer or config is not the model's (issue #24) ---
def test_a_folder_without_its_tokenizer_is_refused_not_answered_wrongly(tiny_saved, tmp_path, capsys):
    folder = tmp_path / "no_tokenizer"
    shutil.copytree(tiny_saved, folder)
    (folder / "tokenizer.json").unlink()  # transformers then builds a 5-token BertTokenizer
    with pytest.raises(ModelLoadError, match="5 tokens but the model was saved with a vocabulary of 30,522"):
        Engine.from_pretrained(folder, device="cpu")
    assert main(["generate", "--model", str(folder), "--prompt", "hello", "--device", "cpu"]) == 2
    assert "tokenizer.json" in capsys.readouterr().err


def test_a_tokenizer_that_reads_english_as_unknown_is_refused(tiny):
    _, processor = tiny

    class AllUnknown:
        unk_token_id = 100

        def __len__(self) -> int:
            return 30_522

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [100] * len(text.split())}

    check_tokenizer(processor.tokenizer, 30_522, "ok")
    with pytest.raises(ModelLoadError, match="ordinary English"):
        check_tokenizer(AllUnknown(), 30_522, "folder")


def test_a_string_where_a_size_belongs_is_one_line(tiny_saved, tmp_path):
    folder = tmp_path / "bad_config"
    shutil.copytree(tiny_saved, folder)
    config = json.loads((folder / "config.json").read_text())
    config["text_config"]["hidden_size"] = "256"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        ModelLoadError, match=r"text_config\.hidden_size must be a positive integer, got '256'"
    ):
        Engine.from_pretrained(folder, device="cpu")
