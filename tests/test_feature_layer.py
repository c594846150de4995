"""`feature_layer`: a vision encoder's slots read a layer below its last (LLaVA's `vision_feature_layer`)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModel, ViTConfig

from metalm import EncoderRecipe, ModelRecipe
from metalm.model.configuration_metalm import MetaLMConfigError, normalize_encoder_spec
from metalm.model.modeling_metalm import MetaLMForCausalLM
from metalm.model.vision import EfficientNetLite0Encoder, packaged_efficientnet_lite0_available
from tests.conftest import TINY_LLAMA, TINY_MODEL, TINY_VIT


def _recipe(**vision) -> ModelRecipe:
    return ModelRecipe(
        decoder=TINY_LLAMA,
        tokenizer="packaged:minilm-l6",
        encoders=[EncoderRecipe("vision", "vision", connector="mlp", **vision)],
    )


def test_efficientnet_feature_layer_is_that_layers_output() -> None:
    torch.manual_seed(0)
    whole = EfficientNetLite0Encoder().eval()
    cut = EfficientNetLite0Encoder(feature_layer=12).eval()
    assert len(cut.layers) == 13 and cut.hidden_size == 192
    assert EfficientNetLite0Encoder(feature_layer=-6).hidden_size == 192  # 18 outputs: -6 is 12
    cut.load_state_dict({k: v for k, v in whole.state_dict().items() if int(k.split(".")[1]) < 13})
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        below = pixels
        for layer in whole.layers[:13]:
            below = layer(below)
        torch.testing.assert_close(cut(pixels), below.flatten(2).transpose(1, 2), atol=0, rtol=0)


def test_several_layers_are_concatenated_from_the_lowest() -> None:
    torch.manual_seed(0)
    whole = EfficientNetLite0Encoder().eval()
    both = EfficientNetLite0Encoder(feature_layer=[-1, 12]).eval()
    both.load_state_dict(whole.state_dict())
    assert both.feature_layers == [12, 17] and both.hidden_size == 192 + 1280
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        maps, outputs = pixels, {}
        for index, layer in enumerate(whole.layers):
            maps = outputs[index] = layer(maps)
        want = torch.cat([outputs[12], outputs[17]], 1).flatten(2).transpose(1, 2)
        torch.testing.assert_close(both(pixels), want, atol=0, rtol=0)


@pytest.mark.parametrize(
    ("layer", "message"),
    [
        (18, r"\[-18, 17\]"),
        (-19, r"\[-18, 17\]"),
        ([5, 17], "different sizes"),
        ([12, -6], "twice"),
        ([], "at least one"),
    ],
)
def test_layers_the_backbone_cannot_give_are_refused(layer, message: str) -> None:
    with pytest.raises(ValueError, match="feature_layer.*" + message):
        EfficientNetLite0Encoder(feature_layer=layer)


@pytest.mark.skipif(not packaged_efficientnet_lite0_available(), reason="weights not installed")
def test_packaged_weights_load_into_the_layers_kept() -> None:
    whole = EfficientNetLite0Encoder.from_packaged().state_dict()
    cut = EfficientNetLite0Encoder.from_packaged(feature_layer=12).state_dict()
    assert cut and set(cut) < set(whole)
    for key, value in cut.items():
        assert torch.equal(value, whole[key]), key


def test_hf_tower_slots_are_the_hidden_state_named_and_survive_save_and_load(tmp_path) -> None:
    torch.manual_seed(0)
    model, processor = _recipe(source="config", config=TINY_VIT, image_size=32, feature_layer=-2).build()
    tower = model.encoders["vision"].backbone
    assert len(tower.layers) == 1  # hidden_states[-2] of a 2-layer tower: the first layer's output
    full = AutoModel.from_config(ViTConfig(**{k: v for k, v in TINY_VIT.items() if k != "model_type"}))
    full.load_state_dict(tower.state_dict(), strict=False)
    pixels = torch.randn(1, 3, 32, 32)
    model.eval(), full.eval()
    with torch.no_grad():
        want = full(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
        got, mask = model.encoders["vision"]({"pixel_values": pixels})
    torch.testing.assert_close(got, want)
    assert mask.all()
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded = MetaLMForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.encoder_spec("vision")["feature_layer"] == -2
    assert set(loaded.state_dict()) == set(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(loaded.encoders["vision"]({"pixel_values": pixels})[0], got)


def test_hf_tower_concatenates_the_hidden_states_named() -> None:
    torch.manual_seed(0)
    model, _ = _recipe(source="config", config=TINY_VIT, image_size=32, feature_layer=[0, -2]).build()
    tower = model.encoders["vision"].backbone.eval()
    assert tower.feature_layers == [0, 1] and model.encoders["vision"].hidden_size == 2 * 32
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        hidden = tower(pixel_values=pixels, output_hidden_states=True).hidden_states
        got, _ = model.encoders["vision"]({"pixel_values": pixels})
    torch.testing.assert_close(got, torch.cat([hidden[0], hidden[1]], -1))


@pytest.mark.parametrize("trainable", [0, 2, 6])
def test_split_at_any_layer_the_cached_path_gives_the_whole_backbones_features(trainable: int) -> None:
    """Layers [12, 17] with the top 0, 2 or 6 layers training: the frozen lower part's outputs (what the
    feature cache keeps) then the upper part give what the backbone gives run whole."""
    torch.manual_seed(0)
    config = {"model_type": "efficientnet_lite0"}
    model, _ = _recipe(
        source="config", config=config, image_size=64, trainable_layers=trainable, feature_layer=[12, 17]
    ).build()
    encoder = model.encoders["vision"].eval()
    assert len(encoder.lower_modules()) == 18 - trainable
    payload = {"pixel_values": torch.randn(3, 3, 64, 64)}
    with torch.no_grad():
        whole = encoder.modality.encode(encoder.backbone, encoder.spec, payload)[0]
        split = encoder(payload)[0]
    torch.testing.assert_close(split, whole)
    assert split.shape == (3, 4, 192 + 1280)


def test_a_saved_spec_without_the_field_reads_its_last_layer() -> None:
    spec = normalize_encoder_spec({"name": "vision", "kind": "vision", "backbone": "efficientnet_lite0"})
    assert spec["feature_layer"] is None
    with pytest.raises(MetaLMConfigError, match="feature_layer"):
        normalize_encoder_spec({**spec, "feature_layer": "12"})
    with pytest.raises(MetaLMConfigError, match="feature_layer"):
        normalize_encoder_spec({**spec, "feature_layer": [12, True]})
    assert normalize_encoder_spec({**spec, "feature_layer": [12, 17]})["feature_layer"] == [12, 17]


def test_training_config_refuses_feature_layer_on_a_text_encoder() -> None:
    from pydantic import ValidationError

    from metalm.training.config_schema import ModelConfig

    text = {**TINY_MODEL["encoders"][0], "feature_layer": 2}
    with pytest.raises(ValidationError, match="feature_layer"):
        ModelConfig(**{**TINY_MODEL, "encoders": [text]})


def test_feature_cache_never_serves_one_layers_features_for_another() -> None:
    from metalm.model.feature_cache import encoder_fingerprint

    def frozen(layer: int | None):
        torch.manual_seed(0)
        config = {"model_type": "efficientnet_lite0"}
        model, _ = _recipe(
            source="config", config=config, image_size=64, trainable_layers=0, feature_layer=layer
        ).build()
        return model.encoders["vision"]

    head, block = frozen(None), frozen(12)
    assert encoder_fingerprint(head) != encoder_fingerprint(block)


def test_a_new_layout_of_the_cached_states_is_a_new_fingerprint(monkeypatch) -> None:
    """Entries a plugin wrote in an earlier layout of its `encode_lower` output are never read as the new one
    (a cache written before this plugin stored each feature layer's map held only the split's map)."""
    from metalm.modalities.vision import VisionModality
    from metalm.model.feature_cache import encoder_fingerprint

    torch.manual_seed(0)
    config = {"model_type": "efficientnet_lite0"}
    model, _ = _recipe(source="config", config=config, image_size=64, trainable_layers=0).build()
    before = encoder_fingerprint(model.encoders["vision"])
    monkeypatch.setattr(VisionModality, "lower_state_format", VisionModality.lower_state_format + 1)
    assert encoder_fingerprint(model.encoders["vision"]) != before


def test_a_layer_the_backbone_lacks_is_a_config_error_naming_the_file_encoder_and_field(tmp_path) -> None:
    """Found on `metalm train ... model.encoders.1.feature_layer=[5,17]`: a traceback, not an error message."""
    from metalm.training.config import ConfigError, config_from_dict
    from metalm.training.model_setup import build_model_for_training
    from tests.training_helpers import tiny_config

    config = tiny_config(tmp_path / "run")
    config["model"]["encoders"][1].update(source="config", config={"model_type": "efficientnet_lite0"})
    config["model"]["encoders"][1].update(image_size=64, feature_layer=[5, 17])
    cfg = config_from_dict(config, source="run.yaml")
    with pytest.raises(
        ConfigError, match=r"run\.yaml: model: encoder 'vision': field 'feature_layer'.*strides"
    ):
        build_model_for_training(cfg, None, fsdp=False, deepspeed=False)
