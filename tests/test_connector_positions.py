"""Learned slot positions on a vision connector (``connector: {type: mlp, positions: learned}``)."""

from __future__ import annotations

import pytest
import torch

from metalm import EncoderRecipe, ModelRecipe, Target
from metalm.model.configuration_metalm import MetaLMConfigError
from metalm.model.connectors import MLPConnector, build_connector
from metalm.model.modeling_metalm import MetaLMForCausalLM
from tests.conftest import TINY_BERT, TINY_LLAMA, TINY_MODEL, TINY_VIT
from tests.test_model import image

POSITIONED = {"type": "mlp", "positions": "learned"}


def _build(connector=POSITIONED, kind: str = "vision"):
    torch.manual_seed(0)
    config = TINY_VIT if kind == "vision" else TINY_BERT
    extra = {"image_size": 32} if kind == "vision" else {"tokenizer": "decoder"}
    encoder = EncoderRecipe(kind, kind, source="config", config=config, connector=connector, **extra)
    return ModelRecipe(decoder=TINY_LLAMA, tokenizer="packaged:minilm-l6", encoders=[encoder]).build()


def test_positions_start_at_zero_so_a_connector_starts_as_it_would_without() -> None:
    torch.manual_seed(0)
    plain = MLPConnector(6, 4)
    positioned = MLPConnector(6, 4, num_positions=5)
    positioned.load_state_dict(plain.state_dict(), strict=False)
    feats, mask = torch.randn(2, 5, 6), torch.ones(2, 5, dtype=torch.bool)
    assert torch.equal(positioned(feats, mask)[0], plain(feats, mask)[0])
    with torch.no_grad():
        positioned.positions.weight.copy_(torch.randn(5, 4))
    shifted = positioned(feats, mask)[0] - plain(feats, mask)[0]
    # Slot i of every image moves by the same vector, its own: the decoder can tell slot i from slot j.
    torch.testing.assert_close(shifted, positioned.positions.weight.expand(2, 5, 4))


def test_the_model_builds_one_vector_per_slot_and_trains_it() -> None:
    model, processor = _build()
    positions = model.connectors["vision"].positions.weight
    assert positions.shape == (model.config.encoders[0]["num_slots"], TINY_LLAMA["hidden_size"])
    assert positions.abs().sum() == 0 and positions.requires_grad
    batch = processor([[image(), Target("a red square")]], padding_side="right")
    model.train()
    model(**batch).loss.backward()
    assert positions.grad is not None and positions.grad.abs().sum() > 0


def test_positions_survive_save_and_load(tmp_path) -> None:
    model, processor = _build()
    with torch.no_grad():
        model.connectors["vision"].positions.weight.normal_()
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded = MetaLMForCausalLM.from_pretrained(tmp_path)
    assert loaded.config.encoders[0]["connector"]["positions"] == "learned"
    torch.testing.assert_close(
        loaded.connectors["vision"].positions.weight, model.connectors["vision"].positions.weight
    )


def test_a_spec_without_positions_builds_the_connector_it_always_did() -> None:
    assert build_connector({"type": "mlp"}, 8, 4, num_slots=4).positions is None
    assert build_connector({"type": "linear"}, 8, 4).positions is None


@pytest.mark.parametrize(
    ("connector", "kind", "message"),
    [
        ({"type": "mlp", "positions": "sine"}, "vision", "'learned' or null"),
        ({"type": "resampler", "positions": "learned"}, "vision", "queries are its positions"),
        ({"type": "linear", "positions": "learned"}, "text", "encoder 'text'.*fixed number of slots"),
    ],
)
def test_positions_it_cannot_have_are_config_errors(connector, kind: str, message: str) -> None:
    with pytest.raises(MetaLMConfigError, match=message):
        _build(connector, kind)


def test_training_config_refuses_positions_on_a_text_encoder() -> None:
    from pydantic import ValidationError

    from metalm.training.config_schema import ModelConfig

    text = {**TINY_MODEL["encoders"][0], "connector": {"type": "linear", "positions": "learned"}}
    with pytest.raises(ValidationError, match="positions: learned is for a vision encoder"):
        ModelConfig(**{**TINY_MODEL, "encoders": [text]})


def _finetune(init, out, **model) -> dict:
    return {
        "init_from": str(init),
        "model": model,
        "data": {"streams": [{"name": "vqa", "source": "easy_vqa_vqa"}], "seq_len": 40, "max_records": 24},
        "optim": {"lr": 5e-3, "warmup_steps": 0, "max_steps": 3, "batch_size": 2},
        "run": {"output_dir": str(out), "log_every": 1, "eval_every": 0, "eval_batches": 1, "save_every": 0,
                "tensorboard": False},
    }  # fmt: skip


def test_init_from_gives_a_saved_connector_positions_that_train_and_are_saved(tiny_saved, tmp_path) -> None:
    import json

    from safetensors.torch import load_file

    from metalm.training.config import config_from_dict
    from metalm.training.trainer import train

    result = train(
        config_from_dict(_finetune(tiny_saved, tmp_path / "run", connector_positions={"vision": "learned"}))
    )
    config = json.loads((result.final_dir / "config.json").read_text())
    assert config["encoders"][1]["connector"]["positions"] == "learned"
    positions = load_file(str(result.final_dir / "model.safetensors"))["connectors.vision.positions.weight"]
    assert positions.abs().sum() > 0  # zero at first, then trained
    loaded = MetaLMForCausalLM.from_pretrained(result.final_dir)
    torch.testing.assert_close(loaded.connectors["vision"].positions.weight, positions)


@pytest.mark.parametrize(
    ("positions", "message"),
    [
        ({"audio": "learned"}, r"connector_positions\.audio: .* no encoder 'audio' \(it has: text, vision\)"),
        (
            {"text": "learned"},
            r"connector_positions\.text: encoder .text.: .*fixed number of slots.*linear connector on a text encoder",
        ),
    ],
)
def test_init_from_positions_it_cannot_add_are_config_errors(
    tiny_saved, tmp_path, positions, message
) -> None:
    from metalm.training.config import ConfigError, config_from_dict
    from metalm.training.trainer import train

    with pytest.raises(ConfigError, match=message):
        train(config_from_dict(_finetune(tiny_saved, tmp_path / "run", connector_positions=positions)))


def test_connector_positions_without_init_from_is_a_config_error(tiny_saved, tmp_path) -> None:
    from metalm.training.config import ConfigError, config_from_dict

    cfg = _finetune(
        tiny_saved, tmp_path / "run", decoder=TINY_LLAMA, connector_positions={"vision": "learned"}
    )
    with pytest.raises(ConfigError, match="model.connector_positions: adds positions to a saved model"):
        config_from_dict({**cfg, "init_from": None})
