"""The `Modality` interface: what a plugin answers for the encoders of its kind (see metalm.modalities)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch
from torch import nn
from transformers import AutoModel

from metalm.data.segment_types import EncodedSegment
from metalm.model.hf_config import MetaLMConfigError, config_from_dict

if TYPE_CHECKING:
    from metalm.recipe import EncoderRecipe

Payload = dict[str, torch.Tensor]


class Processor(Protocol):
    """What a plugin reads of the processor that hands it a part (`metalm.data.processor.MetaLMProcessor`),
    written here so the plugins need not import the processor, which sits above them."""

    config: Any  # the MetaLMConfig
    tokenizer: Any  # the decoder's tokenizer
    preprocessors: dict[str, Any]  # by encoder name
    plugin_memo: dict[tuple[str, str], Any]  # per-encoder facts a plugin works out once

    def tokenize(self, text: str) -> list[int]: ...

    def encoder_for(self, kind: str, requested: str | None, where: str) -> str: ...


class Modality:
    """One encoder kind. Subclasses set the class attributes and implement `encode`, `segment`, `collate`
    and `filler`; the other methods have the defaults of an HF backbone with a fixed slot count."""

    kind: ClassVar[str] = ""
    # The spec fields of this kind, with the defaults filled in when a spec leaves them out.
    spec_defaults: ClassVar[dict[str, Any]] = {}
    # The `backbone` values a spec of this kind may name ("hf": any AutoModel built from its `config`).
    backbones: ClassVar[tuple[str, ...]] = ("hf",)
    # The processor parts this kind reads (e.g. `Encode`, `ImageInput`).
    part_types: ClassVar[tuple[type, ...]] = ()
    # `packaged:<name>` sources this kind loads itself (not HF folders): its `load_backbone` handles them,
    # and a recipe naming one for an encoder of another kind is refused (metalm.recipe).
    packaged_sources: ClassVar[tuple[str, ...]] = ()
    # The record and request field that carries this kind's inputs ("image", "audio": the JSONL schema,
    # metalm.data.records, and a chat turn's lists), which builders, evaluation and serving map back to this
    # plugin (`metalm.modalities.modality_of_field`); None for a kind no record names as a field.
    record_field: ClassVar[str | None] = None
    # When a record carries an input of this kind and the model has no encoder of it: None leaves the input
    # out (a text-only baseline reads the text alone); a message makes the record bad with it.
    missing_encoder_error: ClassVar[str | None] = None
    # The layout of what `encode_lower` returns; feature caches key on it (metalm.model.feature_cache), so a
    # plugin that changes that layout bumps it and the entries written before are never read as the new one.
    lower_state_format: ClassVar[int] = 1

    # --- the encoder spec ---------------------------------------------------------------------------
    def check_spec(self, spec: dict[str, Any]) -> None:
        """Kind-specific checks of a spec whose defaults are filled in; raise ValueError naming the field."""

    def num_slots(self, spec: dict[str, Any], payload_size: int | None) -> int:
        """Decoder slots one payload fills through a per-vector connector; by default the count measured
        when the model was built (`num_slots`). `payload_size`: see `payload_size`."""
        if spec.get("num_slots") is None:
            raise ValueError("'num_slots' is unknown; build the model once to measure it")
        return int(spec["num_slots"])

    # --- the model ----------------------------------------------------------------------------------
    def build_backbone(self, spec: dict[str, Any]) -> nn.Module:
        """A randomly initialised backbone (its weights come from a checkpoint or from the builder)."""
        return AutoModel.from_config(config_from_dict(spec["config"], f"encoder {spec['name']!r}"))

    def encode(
        self, backbone: nn.Module, spec: dict[str, Any], payload: Payload
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The backbone's outputs for a collated payload: `(features [N, L, H], mask [N, L])`, `mask`
        marking the outputs that become decoder slots."""
        raise NotImplementedError

    # --- the frozen lower part (run in eval mode, without gradients; cacheable, metalm.model.feature_cache)
    def lower_modules(self, backbone: nn.Module, spec: dict[str, Any]) -> list[nn.Module] | None:
        """The modules of the backbone's frozen lower part, which `encode_lower` runs; None when there is
        none. By default only a fully frozen backbone (`trainable_layers: 0`) has one: all of it."""
        return [backbone] if spec.get("trainable_layers") == 0 else None

    def encode_lower(self, backbone: nn.Module, spec: dict[str, Any], payload: Payload) -> list[Payload]:
        """The frozen lower part's outputs, one dict of tensors per payload row: a pure function of that
        row's `row_inputs` and the frozen weights. By default (fully frozen): each row's slot vectors."""
        features, mask = self.encode(backbone, spec, payload)
        return [{"features": row[keep]} for row, keep in zip(features, mask)]

    def encode_upper(
        self, backbone: nn.Module, spec: dict[str, Any], states: list[Payload], payload: Payload
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """What `encode` returns, computed from the rows' `encode_lower` states by the trainable upper
        part. By default: the slot vectors, right-padded (connectors read only the masked outputs)."""
        rows = [state["features"] for state in states]
        features = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)
        lengths = torch.tensor([len(row) for row in rows], device=features.device)
        mask = torch.arange(features.shape[1], device=features.device)[None, :] < lengths[:, None]
        return features, mask

    def row_inputs(self, spec: dict[str, Any], payload: Payload) -> list[Payload]:
        """Each payload row's inputs to the lower part, without padding (what a cache entry is keyed on)."""
        size = len(next(iter(payload.values())))
        return [{key: value[i] for key, value in payload.items()} for i in range(size)]

    # --- building from a recipe (metalm.recipe) -----------------------------------------------
    def load_backbone(self, recipe: EncoderRecipe) -> tuple[nn.Module, dict[str, Any], str | None]:
        """The backbone a recipe names, the spec fields that rebuild its architecture (`backbone`,
        `config`), and the folder it was loaded from (None when built from a config)."""
        from metalm.model.packaged import resolve_source

        folder = None if recipe.source == "config" else resolve_source(recipe.source)
        if folder is None:
            if recipe.config is None:
                raise MetaLMConfigError(f"encoder {recipe.name!r}: source 'config' needs a 'config' dict")
            backbone = AutoModel.from_config(config_from_dict(recipe.config, f"encoder {recipe.name!r}"))
        else:
            backbone = AutoModel.from_pretrained(folder)
        return backbone, {"backbone": "hf", "config": backbone.config.to_dict()}, folder

    def complete_spec(
        self,
        recipe: EncoderRecipe,
        spec: dict[str, Any],
        backbone: nn.Module,
        folder: str | None,
        decoder_tokenizer: Any,
    ) -> Any:
        """Fill in the spec's kind-specific fields (measured on the backbone where needed) and return the
        encoder's preprocessor (a tokenizer, an image preprocessor; None when payloads need none)."""
        return None

    def probe_part(self, spec: dict[str, Any]) -> Any:
        """A fixed processor part for encoder `spec["name"]`: the input connector scales are measured on."""
        raise NotImplementedError

    # --- the processor (metalm.data.processor) -------------------------------------------------------
    def default_preprocessor(self, spec: dict[str, Any]) -> Any:
        """The preprocessor when the processor was given none (rebuilt from the spec); ValueError saying
        what is missing when it cannot be."""
        return None

    def save_preprocessor(self, name: str, preprocessor: Any, directory: Path, meta: dict[str, Any]) -> None:
        """Save encoder `name`'s preprocessor into a model folder: files under `directory`, settings into
        the processor file's `meta`."""

    def load_preprocessor(self, spec: dict[str, Any], directory: Path, meta: dict[str, Any]) -> Any:
        """The preprocessor `save_preprocessor` saved (None: rebuild it from the spec)."""
        return None

    def part(self, value: Any, encoder: str | None = None) -> Any:
        """The processor part that hands `value` (a request's or record's input of this kind: a text, an
        image, a clip) to `encoder` (None: the model's only encoder of this kind)."""
        raise NotImplementedError

    def record_part(self, value: Any, encoder: str | None, name: str | None = None) -> Any:
        """The part for a record's input `value` under `record_field`; `name` is how errors name it (its
        file, "data URL", a shard row), for kinds whose parts carry one. By default `part(value, encoder)`."""
        return self.part(value, encoder)

    def alignment_part(self, processor: Processor, name: str, text: str) -> tuple[Any, list[int]] | None:
        """A part of this kind for encoder `name` that carries `text`, and for each slot it fills the decoder
        token that slot should read as (connector alignment, `align_tokens`). None: this kind does not
        carry text, so its connector cannot be aligned to the decoder's word embeddings."""
        return None

    def describe_part(self, part: Any, max_chars: int = 80) -> str:
        """A short one-line rendering of a part this kind reads (for logs and evaluation reports)."""
        return f"<{self.kind}>"

    def segment(self, processor: Processor, part: Any, where: str, cache: Any = None) -> EncodedSegment:
        """The segment a processor part becomes (its encoder picked with `processor.encoder_for`); raise
        `metalm.data.segments.InputError` naming `where` for bad input. `cache`: what `new_cache` made, for a
        reader that meets the same inputs again (training reads every record once per epoch); the
        processor passes it only when the caller has one, so a plugin without caches need not take it."""
        raise NotImplementedError

    def new_cache(self, max_bytes: int) -> Any:
        """A store of prepared payloads (decoded, resized images; log-mel features) that `segment` reads
        through, holding at most `max_bytes`; None when this kind has nothing worth keeping."""
        return None

    # --- collation (metalm.data.segments) ------------------------------------------------------------
    def payload_size(self, seg: EncodedSegment) -> int | None:
        """What `num_slots` needs to know of one payload (a text span's token count); None by default."""
        return None

    def check_segment(self, spec: dict[str, Any], seg: EncodedSegment, where: str) -> None:
        """Raise `metalm.data.segments.SampleError` naming `where` when `seg` cannot be collated."""

    def collate(self, spec: dict[str, Any], segments: list[EncodedSegment]) -> Payload:
        """The payload tensors of one encoder call over `segments`, in order."""
        raise NotImplementedError

    def filler(self, spec: dict[str, Any], preprocessor: Any) -> EncodedSegment:
        """A minimal label-free segment for encoder `spec["name"]` (an FSDP filler row, metalm.training.data)."""
        raise NotImplementedError


def source_name(source: Any) -> str:
    """How a part's source is shown: a path's file name, else "inline" (a data URL, bytes, an array)."""
    if isinstance(source, str) and not source.startswith("data:"):
        return source.rsplit("/", 1)[-1]
    return "inline"


def shorten(text: str, max_chars: int) -> str:
    """`text` on one line, cut to `max_chars` with "..." when longer."""
    text = " ".join(text.split())
    return text if len(text) <= max_chars else text[: max_chars - 3] + "..."
