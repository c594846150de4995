"""`slot_grid`: a vision encoder's feature map average-pooled to G x G slots (an image read larger for the
same number of decoder positions)."""

from __future__ import annotations

import pytest
import torch

from metalm import EncoderRecipe, ModelRecipe
from metalm.model.modeling_metalm import MetaLMForCausalLM
from tests.conftest import TINY_LLAMA, TINY_VIT

EFFICIENTNET = {"model_type": "efficientnet_lite0"}


def _model(**vision):
    torch.manual_seed(0)
    recipe = ModelRecipe(
        decoder=TINY_LLAMA,
        tokenizer="packaged:minilm-l6",
        encoders=[EncoderRecipe("vision", "vision", connector="mlp", **vision)],
    )
    return recipe.build()


@pytest.mark.parametrize("trainable", [None, 0, 2])
def test_efficientnet_slots_are_its_map_average_pooled(trainable: int | None) -> None:
    """128x128 gives the head a 4x4 map; slot_grid 2 gives each slot the mean of one 2x2 quarter of it, and
    the frozen lower part (what the feature cache keeps) then the upper part give the same."""
    model, _ = _model(
        source="config", config=EFFICIENTNET, image_size=128, slot_grid=2, trainable_layers=trainable
    )
    encoder = model.encoders["vision"].eval()
    assert encoder.spec["num_slots"] == 4
    pixels = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        slots, mask = encoder({"pixel_values": pixels})
        full = encoder.backbone(pixels).transpose(1, 2).reshape(2, 1280, 4, 4)
    want = torch.stack([full[..., r : r + 2, c : c + 2].mean((-1, -2)) for r in (0, 2) for c in (0, 2)], 1)
    torch.testing.assert_close(slots, want)
    assert slots.shape == (2, 4, 1280) and mask.all()


def test_hf_tower_keeps_its_class_token_first_and_pools_the_patches(tmp_path) -> None:
    model, processor = _model(source="config", config=TINY_VIT, image_size=32, slot_grid=1)
    encoder = model.encoders["vision"].eval()
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        hidden = encoder.backbone(pixel_values=pixels).last_hidden_state  # [1, 1 + h*w, 32]
        slots, _ = encoder({"pixel_values": pixels})
    assert encoder.spec["num_slots"] == 2 and hidden.shape[1] > 2
    torch.testing.assert_close(slots, torch.stack([hidden[:, 0], hidden[:, 1:].mean(1)], 1))
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded = MetaLMForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.encoder_spec("vision")["slot_grid"] == 1
    with torch.no_grad():
        torch.testing.assert_close(loaded.encoders["vision"]({"pixel_values": pixels})[0], slots)


def test_a_grid_finer_than_the_map_is_refused_with_what_to_do() -> None:
    from metalm.model.configuration_metalm import MetaLMConfigError

    with pytest.raises(
        (ValueError, MetaLMConfigError), match=r"slot_grid.*2x2.*at most 2 or raise image_size"
    ):
        _model(source="config", config=EFFICIENTNET, image_size=64, slot_grid=3)


@pytest.mark.parametrize(("index", "grid"), [(0, 2), (1, 0), (1, -1)])
def test_training_config_refuses_a_slot_grid_off_a_vision_encoder_or_below_one(
    tmp_path, index: int, grid: int
) -> None:
    from metalm.training.config import ConfigError, config_from_dict
    from tests.training_helpers import tiny_config

    config = tiny_config(tmp_path / "run")
    config["model"]["encoders"][index]["slot_grid"] = grid
    with pytest.raises(
        ConfigError, match=rf"run\.yaml: model\.encoders\[{index}\]\.slot_grid: takes an int > 0"
    ):
        config_from_dict(config, source="run.yaml")


def test_feature_cache_fingerprint_names_the_grid() -> None:
    from metalm.model.feature_cache import encoder_fingerprint

    def frozen(grid: int | None):
        model, _ = _model(
            source="config", config=EFFICIENTNET, image_size=128, trainable_layers=0, slot_grid=grid
        )
        return model.encoders["vision"]

    assert encoder_fingerprint(frozen(None)) != encoder_fingerprint(frozen(2))


def test_a_saved_spec_without_the_field_keeps_every_position_and_a_bad_value_is_named() -> None:
    from metalm.model.configuration_metalm import MetaLMConfigError, normalize_encoder_spec

    spec = normalize_encoder_spec({"name": "vision", "kind": "vision", "backbone": "efficientnet_lite0"})
    assert spec["slot_grid"] is None
    for bad in ("2", 0, True):
        with pytest.raises(MetaLMConfigError, match="slot_grid"):
            normalize_encoder_spec({**spec, "slot_grid": bad})
