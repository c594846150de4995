"""Segments and the collator that turns lists of them into a MetaLM batch.

A sample is an ordered list of segments:
- `TextSegment`: decoder tokens, embedded by the decoder itself;
- `EncodedSegment`: a payload for one named encoder (a text span in the encoder's vocabulary, an image, or
  whatever its kind's plugin reads). It fills as many decoder slots as its connector emits.

Labels follow the semi-causal objective and the HF convention (unshifted; position p is trained to predict
labels[p+1]):
- a row's first real position never carries a label (nothing real precedes it, whatever the padding side);
- every text token with `loss=True` is a label, so it is predicted at the position before it;
- the first slot of an encoded text span carries the span's first *decoder* token (`target_ids[0]`), so it
  is predicted at the position before the span;
- all other encoded slots carry -100, so no loss is taken inside a span, and the token after a span is
  predicted at the span's last slot.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from metalm.modalities import get_modality

IGNORE_INDEX = -100


@dataclass
class TextSegment:
    """Causal decoder tokens. `loss=False` for prompt text that is read but not trained on."""

    ids: list[int]
    loss: bool = True


@dataclass
class EncodedSegment:
    """A payload for encoder `encoder`: `input_ids` (a text span in the encoder's vocabulary, without the
    encoder's own special tokens), `pixel_values` ([3, H, W]), or for another kind its plugin's `payload`.
    `target_ids` are a text span in the decoder's vocabulary; with `loss=True` its first token is the
    target at the slot before the segment."""

    encoder: str
    input_ids: list[int] | None = None
    pixel_values: torch.Tensor | None = None
    target_ids: list[int] | None = None
    loss: bool = True
    payload: Any = None


Segment = TextSegment | EncodedSegment
Sample = list[Segment]


class SampleError(ValueError):
    """A sample cannot be collated; the message names the sample and segment."""


class InputError(ValueError):
    """Bad user input; the message names the sample and the part."""


def segment_slots(seg: EncodedSegment, config) -> int:
    """Decoder slots an encoded segment fills."""
    modality = get_modality(config.encoder_spec(seg.encoder)["kind"])
    return config.num_slots(seg.encoder, modality.payload_size(seg))


def sample_length(sample: Sample, config) -> int:
    """Decoder positions a sample occupies."""
    return sum(len(seg.ids) if isinstance(seg, TextSegment) else segment_slots(seg, config) for seg in sample)


def collate(
    samples: Sequence[Sample],
    config,
    *,
    pad_token_id: int,
    padding_side: str = "right",
    max_length: int | None = None,
    pad_to_multiple_of: int | None = None,
) -> dict:
    """Batch samples. All payloads of one encoder across the batch are stacked for a single encoder call.

    Returns `input_ids`, `attention_mask`, `position_ids` (counting real positions only, so padding never
    shifts them), `labels`, `encoder_inputs` and `encoder_slots`."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    rows_ids, rows_labels, rows_owner = [], [], []
    payloads: dict[str, list[EncodedSegment]] = {}
    for i, sample in enumerate(samples):
        ids: list[int] = []
        labels: list[int] = []
        owner: list[str | None] = []
        for j, seg in enumerate(sample):
            where = f"sample {i}, segment {j}"
            if isinstance(seg, TextSegment):
                if not seg.ids:
                    raise SampleError(f"{where}: empty text segment")
                ids += seg.ids
                labels += seg.ids if seg.loss else [IGNORE_INDEX] * len(seg.ids)
                owner += [None] * len(seg.ids)
                continue
            if not isinstance(seg, EncodedSegment):
                raise SampleError(
                    f"{where}: expected TextSegment or EncodedSegment, got {type(seg).__name__}"
                )
            spec = config.encoder_spec(seg.encoder)
            get_modality(spec["kind"]).check_segment(spec, seg, where)
            payloads.setdefault(seg.encoder, []).append(seg)
            n = segment_slots(seg, config)
            first = seg.target_ids[0] if (seg.loss and seg.target_ids) else IGNORE_INDEX
            ids += [pad_token_id] * n
            labels += [first] + [IGNORE_INDEX] * (n - 1)
            owner += [seg.encoder] * n
        if not ids:
            raise SampleError(f"sample {i}: no segments")
        if max_length is not None and len(ids) > max_length:
            raise SampleError(
                f"sample {i}: {len(ids)} decoder positions exceed max_length {max_length}; "
                "shorten it or raise the context length"
            )
        rows_ids.append(ids)
        rows_labels.append(labels)
        rows_owner.append(owner)

    width = max(len(r) for r in rows_ids)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    batch = len(rows_ids)
    input_ids = torch.full((batch, width), pad_token_id, dtype=torch.long)
    labels = torch.full((batch, width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((batch, width), dtype=torch.long)
    # The model's encoder order, so that encoders run in the same order whatever order a batch meets them.
    names = [spec["name"] for spec in config.encoders if spec["name"] in payloads]
    slots = {name: torch.zeros((batch, width), dtype=torch.bool) for name in names}
    for i, (ids, labs, owner) in enumerate(zip(rows_ids, rows_labels, rows_owner)):
        n = len(ids)
        start = 0 if padding_side == "right" else width - n
        input_ids[i, start : start + n] = torch.tensor(ids)
        labels[i, start : start + n] = torch.tensor(labs)
        # Nothing precedes a row's first real position: under left padding a label there would be
        # "predicted" by a pad position, and under right padding the shift drops it anyway.
        labels[i, start] = IGNORE_INDEX
        attention_mask[i, start : start + n] = 1
        for k, name in enumerate(owner):
            if name is not None:
                slots[name][i, start + k] = True
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0) * attention_mask

    encoder_inputs: dict[str, dict[str, torch.Tensor]] = {}
    for name in names:
        spec = config.encoder_spec(name)
        encoder_inputs[name] = get_modality(spec["kind"]).collate(spec, payloads[name])
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "position_ids": position_ids,
        "labels": labels,
        "encoder_inputs": encoder_inputs,
        "encoder_slots": slots,
    }


def to_device(batch: Any, device: torch.device | str) -> Any:
    """`batch` with every tensor in it (nested dicts too: `encoder_inputs`, `encoder_slots`) on `device`."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {key: to_device(value, device) for key, value in batch.items()}
    return batch
