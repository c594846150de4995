"""Adding an encoder kind is one module and one registration: a toy "vector" kind, defined here and in no
src file, is built from a recipe, validated, processed, collated, trained, filled in for FSDP and saved
through the library's own code paths."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import nn

from metalm import (
    EncoderRecipe,
    MetaLMConfig,
    MetaLMConfigError,
    MetaLMForCausalLM,
    MetaLMProcessor,
    ModelRecipe,
    Target,
    build_metalm,
)
from metalm.data.records import TextDocument
from metalm.data.segments import EncodedSegment, InputError, SampleError
from metalm.modalities import encoder_kinds, get_modality, register_modality, unregister_modality
from metalm.modalities.base import Modality, Payload
from metalm.training.config import ConfigError, config_from_dict
from metalm.training.data import DataStream, StreamRecords
from tests.conftest import TINY_BERT, TINY_LLAMA, TINY_MODEL


@dataclass
class VectorInput:
    """A processor part: a few floats (a reading, a tabular row) for a vector encoder."""

    values: Sequence[float] | torch.Tensor
    encoder: str | None = None


class VectorEncoder(nn.Module):
    """A float vector → `slots` feature vectors of `width` (one Linear)."""

    def __init__(self, dim: int, slots: int, width: int) -> None:
        super().__init__()
        self.slots, self.hidden_size = slots, width
        self.proj = nn.Linear(dim, slots * width)

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        return self.proj(values).view(values.shape[0], self.slots, self.hidden_size)


class VectorModality(Modality):
    kind = "vector"
    spec_defaults = {"dim": 4, "width": 16}
    backbones = ("linear",)
    part_types = (VectorInput,)

    def check_spec(self, spec: dict[str, Any]) -> None:
        if not isinstance(spec["dim"], int) or spec["dim"] <= 0:
            raise ValueError(f"field 'dim' must be an int > 0, got {spec['dim']!r}")

    def build_backbone(self, spec: dict[str, Any]) -> nn.Module:
        return VectorEncoder(spec["dim"], spec["num_slots"], spec["width"])

    def encode(self, backbone: nn.Module, spec: dict[str, Any], payload: Payload):
        feats = backbone(payload["values"].to(backbone.proj.weight.dtype))
        return feats, torch.ones(feats.shape[:2], dtype=torch.bool, device=feats.device)

    def load_backbone(self, recipe: EncoderRecipe):
        c = recipe.config or {}
        fields = {"backbone": "linear", "dim": c["dim"], "width": c["width"], "num_slots": c["slots"]}
        return VectorEncoder(c["dim"], c["slots"], c["width"]), fields, None

    def probe_part(self, spec: dict[str, Any]) -> VectorInput:
        return VectorInput(torch.linspace(-1.0, 1.0, spec["dim"]), encoder=spec["name"])

    def segment(self, processor: MetaLMProcessor, part: VectorInput, where: str) -> EncodedSegment:
        name = processor.encoder_for(self.kind, part.encoder, where)
        values = torch.as_tensor(part.values, dtype=torch.float32)
        dim = processor.config.encoder_spec(name)["dim"]
        if values.shape != (dim,):
            raise InputError(f"{where}: encoder {name!r} reads {dim} values, got shape {tuple(values.shape)}")
        return EncodedSegment(name, payload=values)

    def check_segment(self, spec: dict[str, Any], seg: EncodedSegment, where: str) -> None:
        if seg.payload is None:
            raise SampleError(f"{where}: vector encoder {seg.encoder!r} needs a payload")

    def collate(self, spec: dict[str, Any], segments: list[EncodedSegment]) -> Payload:
        return {"values": torch.stack([seg.payload for seg in segments])}

    def filler(self, spec: dict[str, Any], preprocessor: Any) -> EncodedSegment:
        return EncodedSegment(spec["name"], payload=torch.zeros(spec["dim"]), loss=False)


VECTOR = {"dim": 3, "slots": 2, "width": 8}


@pytest.fixture
def vector_kind():
    register_modality(VectorModality())
    yield
    unregister_modality("vector")


def _recipe() -> ModelRecipe:
    return ModelRecipe(
        decoder=TINY_LLAMA,
        tokenizer="packaged:minilm-l6",
        encoders=[
            EncoderRecipe("text", "text", source="config", tokenizer="decoder", config=TINY_BERT),
            EncoderRecipe("reading", "vector", source="config", config=VECTOR, connector="mlp"),
        ],
    )


def _prompts() -> list[list[Any]]:
    return [
        ["sensor", VectorInput([1.0, 0.0, 0.0]), Target("hot")],
        ["sensor", VectorInput([0.0, 0.0, 1.0]), Target("cold")],
    ]


def test_kinds_come_from_the_registry(vector_kind):
    assert encoder_kinds() == ("text", "vision", "audio", "vector")
    assert isinstance(get_modality("vector"), VectorModality)
    with pytest.raises(ValueError, match="already registered"):
        register_modality(VectorModality())
    unregister_modality("vector")
    assert "vector" not in encoder_kinds()
    with pytest.raises(MetaLMConfigError, match=r"'kind' must be one of \('text', 'vision', 'audio'\)"):
        MetaLMConfig(text_config=TINY_LLAMA, encoders=[{"name": "r", "kind": "vector", "backbone": "linear"}])


def test_spec_fields_and_checks_are_the_plugins(vector_kind):
    spec = {"name": "r", "kind": "vector", "backbone": "linear", "num_slots": 2}
    config = MetaLMConfig(text_config=TINY_LLAMA, encoders=[spec])
    assert config.encoder_spec("r")["dim"] == 4 and config.num_slots("r") == 2
    with pytest.raises(MetaLMConfigError, match="encoder 'r': field 'dim'"):
        MetaLMConfig(text_config=TINY_LLAMA, encoders=[{**spec, "dim": 0}])
    with pytest.raises(MetaLMConfigError, match="unknown field"):
        MetaLMConfig(text_config=TINY_LLAMA, encoders=[{**spec, "image_size": 32}])
    with pytest.raises(MetaLMConfigError, match="'backbone' of a vector encoder"):
        MetaLMConfig(text_config=TINY_LLAMA, encoders=[{**spec, "backbone": "hf"}])


def test_a_new_kind_trains_through_the_processor_collator_and_model(vector_kind):
    torch.manual_seed(0)
    model, processor = build_metalm(_recipe())
    batch = processor(_prompts(), padding_side="right")
    assert batch["encoder_inputs"]["reading"]["values"].shape == (2, 3)
    assert batch["encoder_slots"]["reading"].sum(-1).tolist() == [2, 2]
    with pytest.raises(InputError, match="reads 3 values"):
        processor([["sensor", VectorInput([1.0, 2.0])]])

    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(30):
        loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        assert model.encoders["reading"].backbone.proj.weight.grad.abs().sum() > 0
        optimizer.step()
    # Only the vector tells the two rows apart, so answering both means the decoder reads the encoder.
    with torch.no_grad():
        logits = model.eval()(**batch).logits
    for row, labels in enumerate(batch["labels"]):
        first = int((labels != -100).nonzero()[0])
        assert logits[row, first - 1].argmax() == labels[first]


def test_a_new_kind_saves_and_loads(vector_kind, tmp_path):
    model, processor = build_metalm(_recipe())
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded = MetaLMForCausalLM.from_pretrained(tmp_path).eval()
    loaded_processor = MetaLMProcessor.from_pretrained(tmp_path, config=loaded.config)
    batch = processor(_prompts())
    assert loaded_processor(_prompts())["encoder_inputs"]["reading"]["values"].equal(
        batch["encoder_inputs"]["reading"]["values"]
    )
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model.eval()(**batch).logits)


def test_training_config_and_filler_rows_take_a_new_kind(vector_kind):
    encoder = {"name": "reading", "kind": "vector", "source": "config", "config": VECTOR}
    cfg = config_from_dict(
        {"model": {**TINY_MODEL, "encoders": [encoder]}, "data": {"streams": [{"source": "pydoc"}]}}
    )
    assert cfg.model.encoders[0].kind == "vector"
    unregister_modality("vector")
    with pytest.raises(ConfigError, match=r"model.encoders\[0\].kind: expected 'text', 'vision' or 'audio'"):
        config_from_dict(
            {"model": {**TINY_MODEL, "encoders": [encoder]}, "data": {"streams": [{"source": "pydoc"}]}}
        )
    register_modality(VectorModality())

    model, processor = build_metalm(_recipe())
    docs = [TextDocument("a short text about the weather today") for _ in range(4)]
    stream = DataStream([StreamRecords("docs", 1.0, docs)], processor, seq_len=16, batch_size=1)
    batch = processor.collate([stream._filler(["reading"])])
    assert batch["encoder_inputs"]["reading"]["values"].equal(torch.zeros(1, 3))
    assert (batch["labels"] == -100).all()
    assert torch.isfinite(model(**batch).logits).all()
