"""Text encoders (BERT-like, e.g. MiniLM): a span of text read bidirectionally, one slot per span token.

The processor part is `Encode`; a segment holds the span in the encoder's vocabulary (`input_ids`) and in
the decoder's (`target_ids`, whose first token is the label at the slot before the span). The payload is
`prefix + span + suffix` per span (e.g. [CLS] span [SEP]), right-padded, with `slot_mask` marking the
span's own outputs: only those become decoder slots."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers import AutoTokenizer

from metalm.data.segment_types import EncodedSegment, InputError, SampleError
from metalm.modalities import register_modality
from metalm.modalities.base import Modality, Payload, Processor, shorten
from metalm.model.hf_config import MetaLMConfigError

if TYPE_CHECKING:
    from metalm.recipe import EncoderRecipe


@dataclass
class Encode:
    """Text to be read by a bidirectional encoder instead of the decoder. `encoder=None` picks the model's
    only text encoder. With `loss=True` (pre-training spans) its first token is a training target.

    Text already tokenised (training caches its records' token ids) comes as `ids`, the span in the
    decoder's vocabulary, with `text` left empty; `encoder_ids` may carry what `to_encoder_ids` gives for
    them, worked out once by the caller."""

    text: str = ""
    encoder: str | None = None
    loss: bool = False
    ids: list[int] | None = None
    encoder_ids: list[int] | None = None


# Ordinary words: the tokens encoded slots sit among (the probe that connector scales are matched on).
PROBE_TEXT = (
    "A small red circle sits next to a blue square on a white background. The news today covers sport, "
    "business, politics and the weather."
)


def span_limit(spec: dict[str, Any]) -> int:
    """The longest span (in encoder tokens) a text encoder takes: its `max_length` less its special tokens."""
    return spec["max_length"] - len(spec["prefix_ids"]) - len(spec["suffix_ids"])


class TextModality(Modality):
    kind = "text"
    spec_defaults = {"max_length": 512, "prefix_ids": [], "suffix_ids": [], "pad_id": 0}
    part_types = (Encode,)

    def num_slots(self, spec: dict[str, Any], payload_size: int | None) -> int:
        if payload_size is None:
            raise ValueError("a text span needs its token count")
        return int(payload_size)

    def encode(
        self, backbone: nn.Module, spec: dict[str, Any], payload: Payload
    ) -> tuple[torch.Tensor, torch.Tensor]:
        out = backbone(input_ids=payload["input_ids"], attention_mask=payload["attention_mask"])
        return out.last_hidden_state, payload["slot_mask"]

    # --- the frozen lower part: a BERT splits between its layers, other encoders only fully frozen -----
    def lower_modules(self, backbone: nn.Module, spec: dict[str, Any]) -> list[nn.Module] | None:
        if not _splits_by_layer(backbone):
            return super().lower_modules(backbone, spec)
        trainable = spec.get("trainable_layers")
        layers = backbone.encoder.layer
        if trainable is None or trainable >= len(layers):
            return None
        return [backbone.embeddings, *list(layers)[: len(layers) - trainable]]

    def encode_lower(self, backbone: nn.Module, spec: dict[str, Any], payload: Payload) -> list[Payload]:
        if not _splits_by_layer(backbone):
            return super().encode_lower(backbone, spec, payload)
        embeddings, *layers = self.lower_modules(backbone, spec)
        hidden = _run_layers(backbone, layers, embeddings(input_ids=payload["input_ids"]), payload)
        lengths = payload["attention_mask"].sum(1).tolist()  # rows are right-padded (collate)
        return [{"hidden": row[:n]} for row, n in zip(hidden, lengths)]

    def encode_upper(
        self, backbone: nn.Module, spec: dict[str, Any], states: list[Payload], payload: Payload
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not _splits_by_layer(backbone):
            return super().encode_upper(backbone, spec, states, payload)
        first = states[0]["hidden"]
        hidden = first.new_zeros(len(states), payload["input_ids"].shape[1], first.shape[-1])
        for i, state in enumerate(states):
            hidden[i, : len(state["hidden"])] = state["hidden"]
        upper = list(backbone.encoder.layer)[len(self.lower_modules(backbone, spec)) - 1 :]
        return _run_layers(backbone, upper, hidden, payload), payload["slot_mask"]

    def row_inputs(self, spec: dict[str, Any], payload: Payload) -> list[Payload]:
        lengths = payload["attention_mask"].sum(1).tolist()
        return [{"input_ids": row[:n]} for row, n in zip(payload["input_ids"], lengths)]

    def complete_spec(
        self,
        recipe: EncoderRecipe,
        spec: dict[str, Any],
        backbone: nn.Module,
        folder: str | None,
        decoder_tokenizer: Any,
    ) -> Any:
        """The span's special tokens and length limit come from the encoder's tokenizer and positions."""
        from metalm.model.packaged import load_tokenizer

        source = recipe.tokenizer or (recipe.source if recipe.source != "config" else None)
        if source is None:
            raise MetaLMConfigError(
                f"encoder {recipe.name!r}: a text encoder from a config needs 'tokenizer'"
            )
        tok = decoder_tokenizer if source == "decoder" else load_tokenizer(source)
        limit = getattr(backbone.config, "max_position_embeddings", 512)
        prefix = tok.cls_token_id if tok.cls_token_id is not None else tok.bos_token_id
        suffix = tok.sep_token_id if tok.sep_token_id is not None else tok.eos_token_id
        spec.update(
            max_length=min(recipe.max_length or limit, limit),
            prefix_ids=[prefix] if prefix is not None else [],
            suffix_ids=[suffix] if suffix is not None else [],
            pad_id=tok.pad_token_id if tok.pad_token_id is not None else 0,
        )
        return tok

    def probe_part(self, spec: dict[str, Any]) -> Encode:
        return Encode(PROBE_TEXT, encoder=spec["name"])

    # --- a span in the encoder's vocabulary (the processor's decoder tokenizer, the encoder's own) ---------
    @staticmethod
    def span_limit(spec: dict[str, Any]) -> int:
        """See the module-level `span_limit`."""
        return span_limit(spec)

    def shares_vocabulary(self, processor: Processor, name: str) -> bool:
        """Whether encoder `name` reads the decoder's vocabulary (the paper's setting): a decoder span is
        then its own encoder input; otherwise the span is decoded and re-tokenised. Worked out once per
        processor (comparing two vocabularies is slow)."""
        key = (name, "shares_vocabulary")
        if key not in processor.plugin_memo:
            same = processor.preprocessors[name].get_vocab() == processor.tokenizer.get_vocab()
            processor.plugin_memo[key] = same
        return processor.plugin_memo[key]

    def encoder_ids(self, processor: Processor, name: str, text: str) -> list[int]:
        """`text` in text encoder `name`'s vocabulary (the decoder's tokens when the two share one)."""
        if self.shares_vocabulary(processor, name):
            return processor.tokenize(text)
        return processor.preprocessors[name](text, add_special_tokens=False)["input_ids"]

    def to_encoder_ids(self, processor: Processor, name: str, decoder_ids: list[int]) -> list[int]:
        """A decoder-token span in text encoder `name`'s vocabulary."""
        if self.shares_vocabulary(processor, name):
            return list(decoder_ids)
        text = processor.tokenizer.decode(decoder_ids, skip_special_tokens=True)
        return processor.preprocessors[name](text, add_special_tokens=False)["input_ids"]

    def fits_encoder(self, processor: Processor, name: str, text: str, max_tokens: int | None = None) -> bool:
        """Whether `Encode(text)` is a span text encoder `name` takes: at least one token, and no more
        than its span limit (nor `max_tokens`, when given)."""
        limit = span_limit(processor.config.encoder_spec(name))
        limit = limit if max_tokens is None else min(limit, max_tokens)
        return 0 < len(self.encoder_ids(processor, name, text)) <= limit

    def alignment_part(self, processor: Processor, name: str, text: str) -> tuple[Encode, list[int]] | None:
        """`text` (cut to the span limit) as a tokenised `Encode` part, and for each of its encoder tokens the decoder
        token whose characters hold that token's first character: a word split into more pieces on one
        side maps its pieces onto the other side's piece under them. Both tokenizers must be fast ones
        (character offsets)."""
        encoder_tok, decoder_tok = processor.preprocessors[name], processor.tokenizer
        if not (getattr(encoder_tok, "is_fast", False) and getattr(decoder_tok, "is_fast", False)):
            raise ValueError(
                f"aligning encoder {name!r}'s connector needs fast tokenizers (character offsets)"
            )
        limit = span_limit(processor.config.encoder_spec(name))
        enc = encoder_tok(text, add_special_tokens=False, return_offsets_mapping=True)
        encoder_ids, offsets = enc["input_ids"][:limit], enc["offset_mapping"][:limit]
        if not offsets:
            return None
        dec = decoder_tok(text[: offsets[-1][1]], add_special_tokens=False, return_offsets_mapping=True)
        dec_ids, dec_offsets = dec["input_ids"], dec["offset_mapping"]
        if not dec_ids:
            return None
        targets, j = [], 0
        for start, _ in offsets:
            while j + 1 < len(dec_offsets) and dec_offsets[j][1] <= start:
                j += 1
            targets.append(dec_ids[j])
        # Tokenised already, so the span is the encoder tokens the targets were paired with, one slot each.
        return Encode(encoder=name, ids=dec_ids, encoder_ids=encoder_ids), targets

    # --- the tokenizer ---------------------------------------------------------------------------------
    def default_preprocessor(self, spec: dict[str, Any]) -> Any:
        raise ValueError("has no tokenizer")

    def save_preprocessor(self, name: str, preprocessor: Any, directory: Path, meta: dict[str, Any]) -> None:
        preprocessor.save_pretrained(directory / "encoders" / name)
        meta["encoder_tokenizers"] = sorted([*meta.get("encoder_tokenizers", []), name])

    def load_preprocessor(self, spec: dict[str, Any], directory: Path, meta: dict[str, Any]) -> Any:
        if spec["name"] not in meta.get("encoder_tokenizers", []):
            return None
        return AutoTokenizer.from_pretrained(directory / "encoders" / spec["name"])

    def part(self, value: str, encoder: str | None = None) -> Encode:
        return Encode(value, encoder=encoder)

    def describe_part(self, part: Encode, max_chars: int = 80) -> str:
        return f"[enc: {shorten(part.text, max_chars)}]"

    def segment(self, processor: Processor, part: Encode, where: str) -> EncodedSegment:
        if part.ids is None and (not isinstance(part.text, str) or not part.text.strip()):
            raise InputError(f"{where}: empty text to encode")
        name = processor.encoder_for(self.kind, part.encoder, where)
        if part.ids is not None:  # tokenised already
            target_ids = part.ids
            enc_ids = part.encoder_ids
            if enc_ids is None:
                enc_ids = self.to_encoder_ids(processor, name, target_ids)
            if not enc_ids:
                raise InputError(f"{where}: the span is empty in encoder {name!r}'s vocabulary")
        else:
            enc_ids = self.encoder_ids(processor, name, part.text)
            target_ids = None
        limit = span_limit(processor.config.encoder_spec(name))
        if len(enc_ids) > limit:
            raise InputError(
                f"{where}: text to encode has {len(enc_ids)} tokens, more than encoder {name!r} "
                f"takes ({limit}); shorten it or split it into several Encode parts"
            )
        if target_ids is None:
            target_ids = processor.tokenize(part.text)
        return EncodedSegment(name, input_ids=enc_ids, target_ids=target_ids, loss=part.loss)

    # --- collation -------------------------------------------------------------------------------------
    def payload_size(self, seg: EncodedSegment) -> int | None:
        return None if seg.payload is None else len(seg.payload)

    def check_segment(self, spec: dict[str, Any], seg: EncodedSegment, where: str) -> None:
        if not seg.payload:
            raise SampleError(f"{where}: encoded text span for {seg.encoder!r} is empty")
        if len(seg.payload) > span_limit(spec):
            raise SampleError(
                f"{where}: span of {len(seg.payload)} tokens exceeds encoder {seg.encoder!r}'s "
                f"limit of {span_limit(spec)}; split the span or raise the encoder's max_length"
            )

    def collate(self, spec: dict[str, Any], segments: list[EncodedSegment]) -> Payload:
        prefix, suffix = spec["prefix_ids"], spec["suffix_ids"]
        spans = [seg.payload for seg in segments]
        rows = [prefix + span + suffix for span in spans]
        width = max(len(r) for r in rows)
        # Built as lists and made tensors once (a write per row costs more than the whole batch).
        pads = [width - len(r) for r in rows]
        ids = torch.tensor([r + [spec["pad_id"]] * n for r, n in zip(rows, pads)], dtype=torch.long)
        mask = torch.tensor([[1] * len(r) + [0] * n for r, n in zip(rows, pads)], dtype=torch.long)
        slot = torch.tensor(
            [
                [False] * len(prefix) + [True] * len(span) + [False] * (len(suffix) + n)
                for span, n in zip(spans, pads)
            ],
            dtype=torch.bool,
        )
        return {"input_ids": ids, "attention_mask": mask, "slot_mask": slot}

    def filler(self, spec: dict[str, Any], preprocessor: Any) -> EncodedSegment:
        return EncodedSegment(spec["name"], input_ids=[spec["pad_id"]], loss=False)


def _splits_by_layer(backbone: nn.Module) -> bool:
    """A BERT: embeddings, then a stack of post-norm layers and nothing after them, so its forward pass is
    `encoder.layer` applied in turn to the embeddings under one bidirectional mask."""
    config = getattr(backbone, "config", None)
    return (
        getattr(config, "model_type", None) == "bert"
        and not config.is_decoder
        and isinstance(getattr(getattr(backbone, "encoder", None), "layer", None), nn.ModuleList)
    )


def _run_layers(
    backbone: nn.Module, layers: list[nn.Module], hidden: torch.Tensor, payload: Payload
) -> torch.Tensor:
    """`hidden` through `layers` under the payload's attention mask, as BertModel.forward runs them."""
    from transformers.masking_utils import create_bidirectional_mask

    mask = create_bidirectional_mask(
        config=backbone.config, inputs_embeds=hidden, attention_mask=payload["attention_mask"]
    )
    for layer in layers:
        hidden = layer(hidden, mask)
    return hidden


# The registered plugin: what code above the plugins (evaluation, serving) calls for text-encoder helpers.
TEXT = register_modality(TextModality())
