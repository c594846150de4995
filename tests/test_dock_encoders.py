"""Docking an encoder a saved model lacks (`metalm.recipe.dock_encoders`, `init_from` + `model.encoders`):
the new encoder and its fresh connector join the model, everything else keeps its weights, and a run that
starts from the saved model trains the new encoder's connector on spoken questions (configs/speech.yaml).
Tiny random models and generated tones."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from metalm import EncoderRecipe, MetaLMForCausalLM, MetaLMProcessor
from metalm.modalities.audio import AudioInput
from metalm.recipe import dock_encoders, match_connector_scale
from metalm.training.config import ConfigError, config_from_dict
from metalm.training.init_from import preset_that_writes
from tests.test_audio import TINY_WHISPER, tone

soundfile = pytest.importorskip("soundfile")


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread (conftest.py)


def speech_recipe(trainable_layers: int | None = 0) -> EncoderRecipe:
    return EncoderRecipe(
        "speech",
        "audio",
        source="config",
        config={**TINY_WHISPER, "frame_stack": 4, "max_seconds": 3},
        connector="mlp",
        trainable_layers=trainable_layers,
    )


def test_a_docked_encoder_joins_and_the_rest_keeps_its_weights(tiny_saved, tmp_path):
    model = MetaLMForCausalLM.from_pretrained(tiny_saved).eval()
    processor = MetaLMProcessor.from_pretrained(tiny_saved, config=model.config)
    factors = dock_encoders(model, processor, [speech_recipe()])
    assert list(factors) == ["speech"]  # only the new connector is rescaled
    assert [s["name"] for s in model.config.encoders] == ["text", "vision", "speech"]
    state = model.state_dict()
    for key, value in MetaLMForCausalLM.from_pretrained(tiny_saved).state_dict().items():
        assert torch.equal(state[key], value), key
    assert not any(p.requires_grad for p in model.encoders["speech"].parameters())  # trainable_layers 0
    assert all(p.requires_grad for p in model.connectors["speech"].parameters())
    # It hears: a clip becomes slots, and the model saves and loads with the new encoder.
    batch = processor([[AudioInput(tone(440, 0.5)), "answer:"]])
    with torch.no_grad():
        logits = model(**batch).logits
    model.save_pretrained(tmp_path / "m")
    processor.save_pretrained(tmp_path / "m")
    reloaded = MetaLMForCausalLM.from_pretrained(tmp_path / "m").eval()
    again = MetaLMProcessor.from_pretrained(tmp_path / "m")([[AudioInput(tone(440, 0.5)), "answer:"]])
    with torch.no_grad():
        assert torch.allclose(reloaded(**again).logits, logits, atol=1e-5)


def test_the_new_connector_lands_on_the_decoder_scale(tiny_saved):
    model = MetaLMForCausalLM.from_pretrained(tiny_saved).eval()
    processor = MetaLMProcessor.from_pretrained(tiny_saved, config=model.config)
    dock_encoders(model, processor, [speech_recipe()])
    # Scaled once already: a second matching finds the output on the embedding scale (factor ~1).
    assert match_connector_scale(model, processor, ["speech"])["speech"] == pytest.approx(1.0, rel=1e-3)


def test_an_encoder_the_model_has_is_refused(tiny_saved):
    model = MetaLMForCausalLM.from_pretrained(tiny_saved)
    processor = MetaLMProcessor.from_pretrained(tiny_saved, config=model.config)
    with pytest.raises(ValueError, match="encoder 'vision': the model already has an encoder of that name"):
        dock_encoders(model, processor, [EncoderRecipe("vision", "audio", config=TINY_WHISPER)])


def spoken_vqa_config(tiny_saved, tmp_path, encoders: list[dict]) -> dict:
    from PIL import Image

    soundfile.write(tmp_path / "q.wav", tone(440, 0.6), 16000)
    Image.new("RGB", (32, 32), (255, 0, 0)).save(tmp_path / "red.png")
    line = '{"kind": "vqa", "image": "red.png", "audio": "q.wav", "question": "what color?", "answer": "red"}'
    (tmp_path / "spoken.jsonl").write_text("\n".join([line] * 4) + "\n")
    return {
        "init_from": str(tiny_saved),
        "model": {"encoders": encoders, "decoder_trainable": False},
        "data": {"streams": [{"name": "spoken", "source": str(tmp_path / "spoken.jsonl")}], "seq_len": 40},
        "optim": {"lr": 1e-2, "warmup_steps": 0, "max_steps": 2, "batch_size": 2},
        "run": {"output_dir": str(tmp_path / "run"), "log_every": 1, "eval_every": 0, "eval_batches": 1,
                "save_every": 0, "tensorboard": False, "feature_cache": str(tmp_path / "features")},
    }  # fmt: skip


def test_init_from_docks_the_config_encoders_and_trains_their_connector(tiny_saved, tmp_path):
    from metalm.training.trainer import train

    encoder = {"name": "speech", "kind": "audio", "source": "config", "connector": "mlp",
               "trainable_layers": 0, "config": {**TINY_WHISPER, "frame_stack": 4, "max_seconds": 3}}  # fmt: skip
    result = train(config_from_dict(spoken_vqa_config(tiny_saved, tmp_path, [encoder])))
    before, after = (
        load_file(str(tiny_saved / "model.safetensors")),
        load_file(str(result.final_dir / "model.safetensors")),
    )
    new = set(after) - set(before)
    assert new and all(k.startswith(("encoders.speech.", "connectors.speech.")) for k in new)
    decoder = [k for k in before if k.startswith("decoder.")]
    assert decoder and all(torch.equal(before[k], after[k]) for k in decoder)  # loaded, and frozen here
    reloaded = MetaLMForCausalLM.from_pretrained(result.final_dir)
    assert [s["name"] for s in reloaded.config.encoders] == ["text", "vision", "speech"]
    assert any((tmp_path / "features").rglob("*.safetensors"))  # the frozen Whisper's outputs cached


def test_init_from_refuses_an_encoder_it_has(tiny_saved, tmp_path):
    from metalm.training.trainer import train

    encoder = {"name": "text", "kind": "audio", "source": "config", "config": TINY_WHISPER}
    with pytest.raises(ConfigError, match="model.encoders: encoder 'text': the model already has"):
        train(config_from_dict(spoken_vqa_config(tiny_saved, tmp_path, [encoder])))


def test_a_missing_init_from_names_the_preset_that_writes_it(tmp_path):
    from metalm.training.config import load_config
    from metalm.training.trainer import train

    (tmp_path / "base.yaml").write_text("run: {output_dir: runs/base}\n")
    (tmp_path / "next.yaml").write_text(
        "init_from: runs/base/final\ndata: {streams: [{source: bbc_news}]}\n"
        f"run: {{output_dir: {tmp_path / 'out'}}}\n"
    )
    assert preset_that_writes("runs/base/final", str(tmp_path / "next.yaml")) == tmp_path / "base.yaml"
    with pytest.raises(ConfigError, match=r"train it first with `metalm train .*base.yaml`"):
        train(load_config(tmp_path / "next.yaml"))


def test_the_speech_preset_docks_whisper_on_the_quickstart_model():
    from metalm.training.config import load_config

    preset = Path(__file__).resolve().parents[1] / "src" / "metalm" / "configs" / "speech.yaml"
    cfg = load_config(preset)
    assert cfg.init_from == "runs/quickstart/final" and cfg.run.feature_cache
    assert preset_that_writes(cfg.init_from, str(preset)).name == "quickstart.yaml"
    (speech,) = cfg.model.encoders
    assert (speech.kind, speech.source, speech.trainable_layers) == ("audio", "packaged:whisper-tiny-en", 0)
