"""The collator: lists of segments (`metalm.data.segment_types`) into a MetaLM batch.

A sample is an ordered list of segments: `TextSegment`s (decoder tokens) and `EncodedSegment`s (a payload
for one named encoder, which fills as many decoder slots as its connector emits). The collator asks each
encoder's kind plugin (through the registry, `metalm.modalities`) how many slots a payload fills, whether
it can be collated, and how the payloads of one encoder stack into one call.

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

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

# The segment types live below the plugins; they are re-exported here, where most callers import them.
from metalm.data.segment_types import (
    IGNORE_INDEX,
    EncodedSegment,
    InputError,
    Sample,
    SampleError,
    Segment,
    TextSegment,
)
from metalm.modalities import get_modality

__all__ = [
    "IGNORE_INDEX",
    "EncodedSegment",
    "InputError",
    "Sample",
    "SampleError",
    "Segment",
    "TextSegment",
    "collate",
    "pack_rows",
    "sample_length",
    "segment_slots",
    "tight_packing",
    "to_device",
]


def segment_slots(seg: EncodedSegment, config) -> int:
    """Decoder slots an encoded segment fills."""
    modality = get_modality(config.encoder_spec(seg.encoder)["kind"])
    return config.num_slots(seg.encoder, modality.payload_size(seg))


def sample_length(sample: Sample, config) -> int:
    """Decoder positions a sample occupies."""
    return sum(len(seg.ids) if isinstance(seg, TextSegment) else segment_slots(seg, config) for seg in sample)


# The [B, T] tensors of a batch's rows, as _lay_out_rows returns them.
ROW_FIELDS = ("input_ids", "attention_mask", "position_ids", "labels", "sequence_ids")


@dataclass
class _Flat:
    """One sample laid out for the decoder, before it is put in a row."""

    ids: list[int]
    labels: list[int]
    slots: list[tuple[str, int, int]]  # each encoded segment's (encoder, first position, slot count)
    encoded: list[EncodedSegment]


def _flatten(sample: Sample, i: int, config, pad_token_id: int, max_length: int | None) -> _Flat:
    """One sample's decoder ids, labels, slot spans and encoded segments."""
    flat = _Flat([], [], [], [])
    for j, seg in enumerate(sample):
        where = f"sample {i}, segment {j}"
        if isinstance(seg, TextSegment):
            if not seg.ids:
                raise SampleError(f"{where}: empty text segment")
            flat.ids += seg.ids
            flat.labels += seg.ids if seg.loss else [IGNORE_INDEX] * len(seg.ids)
            continue
        if not isinstance(seg, EncodedSegment):
            raise SampleError(f"{where}: expected TextSegment or EncodedSegment, got {type(seg).__name__}")
        spec = config.encoder_spec(seg.encoder)
        get_modality(spec["kind"]).check_segment(spec, seg, where)
        flat.encoded.append(seg)
        n = segment_slots(seg, config)
        first = seg.target_ids[0] if (seg.loss and seg.target_ids) else IGNORE_INDEX
        flat.slots.append((seg.encoder, len(flat.ids), n))
        flat.ids += [pad_token_id] * n
        flat.labels += [first] + [IGNORE_INDEX] * (n - 1)
    if not flat.ids:
        raise SampleError(f"sample {i}: no segments")
    if max_length is not None and len(flat.ids) > max_length:
        raise SampleError(
            f"sample {i}: {len(flat.ids)} decoder positions exceed max_length {max_length}; "
            "shorten it or raise the context length"
        )
    # Nothing precedes a sample's first position: under left padding a label there would be "predicted"
    # by a pad position, under right padding the shift drops it anyway, and in a packed row it would be
    # predicted by the previous sample's last position.
    flat.labels[0] = IGNORE_INDEX
    return flat


def pack_rows(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Sample indices grouped into rows of at most `capacity` positions, first-fit decreasing (ties in
    sample order, so the packing is a pure function of the lengths). Each row lists its samples in the
    order they were placed."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda k: (-lengths[k], k)):
        if lengths[i] > capacity:
            raise SampleError(f"sample {i}: {lengths[i]} decoder positions exceed the pack length {capacity}")
        row = next((r for r, left in enumerate(room) if left >= lengths[i]), None)
        if row is None:
            rows.append([])
            room.append(capacity)
            row = len(rows) - 1
        rows[row].append(i)
        room[row] -= lengths[i]
    return rows


def tight_packing(lengths: Sequence[int], limit: int) -> list[list[int]]:
    """:func:`pack_rows` at the row capacity (at most `limit`) that leaves the least padding: the batch is
    as wide as its longest row, so filling rows up to `limit` can leave a last, short row padded to
    `limit`. Tried: `limit`, the longest sample (never more padding than one sample a row), and for each
    row count k the capacity that would split the positions evenly over k rows (ties: fewer rows)."""
    longest, total = max(lengths), sum(lengths)
    capacities = {limit, min(longest, limit)} | {
        c for k in range(1, len(lengths) + 1) if longest <= (c := -(-total // k)) <= limit
    }
    best: tuple[int, int, list[list[int]]] | None = None
    for capacity in sorted(capacities, reverse=True):
        rows = pack_rows(lengths, capacity)
        width = max(sum(lengths[i] for i in row) for row in rows)
        if best is None or (len(rows) * width, len(rows)) < best[:2]:
            best = (len(rows) * width, len(rows), rows)
    return best[2]


def collate(
    samples: Sequence[Sample],
    config,
    *,
    pad_token_id: int,
    padding_side: str = "right",
    max_length: int | None = None,
    pad_to_multiple_of: int | None = None,
    pack: int | None = None,
    transcripts: Mapping[str, float] | None = None,
) -> dict:
    """Batch samples. All payloads of one encoder across the batch are stacked for a single encoder call.

    Returns `input_ids`, `attention_mask`, `position_ids` (counting each sample's real positions only, so
    padding never shifts them), `labels`, `encoder_inputs` and `encoder_slots`.

    `pack`: put several samples in one row of at most `pack` positions (:func:`tight_packing`, right
    padding only). Each sample's position ids restart at 0, and `sequence_ids` ([B, T]: the sample's index in its
    row, -1 on padding) is added; the model then keeps attention inside each sample (see
    `MetaLMForCausalLM.forward`). Without `pack` a row is one sample, as before.

    `transcripts` ({encoder name: loss weight}, training): for those encoders, `encoder_transcripts[name]`
    holds what each payload says, in payload order (`ids` [N, L] right-padded, `lengths` [N], 0 where a
    segment carries none; a segment's `target_ids` with `loss=False`) and the `weight` of the model's
    transcript loss (`metalm.model.objectives.transcript_loss`)."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if pack is not None and padding_side != "right":
        raise ValueError("packed rows are right-padded (packing is for training)")
    flats = [_flatten(sample, i, config, pad_token_id, max_length) for i, sample in enumerate(samples)]
    groups = (
        [[i] for i in range(len(flats))] if pack is None else tight_packing([len(f.ids) for f in flats], pack)
    )

    width = max(sum(len(flats[i].ids) for i in group) for group in groups)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    rows, payloads, owners = _lay_out_rows(flats, groups, width, pad_token_id, padding_side)
    encoder_inputs, slots = _encoder_batch(config, payloads, owners, (len(groups), width))
    sequence_ids = rows.pop("sequence_ids")
    out = {**rows, "encoder_inputs": encoder_inputs, "encoder_slots": slots}
    if pack is not None:
        out["sequence_ids"] = sequence_ids
    heard = {
        name: _transcripts(payloads[name], weight)
        for name, weight in (transcripts or {}).items()
        if name in payloads and weight
    }
    if heard:
        out["encoder_transcripts"] = heard
    return out


def _lay_out_rows(
    flats: list[_Flat], groups: list[list[int]], width: int, pad_token_id: int, padding_side: str
) -> tuple[dict[str, torch.Tensor], dict[str, list[EncodedSegment]], dict[str, tuple[list[int], list[int]]]]:
    """The batch's rows: each group's flattened samples side by side, padded on `padding_side`; with the
    encoded payloads in reading order and, for each encoder, the (rows, positions) of its slots."""
    # Rows are laid out as lists and made tensors once: a batch has thousands of positions, and an
    # indexing write per sample or per slot costs more than building the whole batch this way.
    columns: dict[str, list[list[int]]] = {key: [] for key in ROW_FIELDS}
    payloads: dict[str, list[EncodedSegment]] = {}
    owners: dict[str, tuple[list[int], list[int]]] = {}
    for r, group in enumerate(groups):
        row: dict[str, list[int]] = {key: [] for key in ROW_FIELDS}
        pad = width - sum(len(flats[i].ids) for i in group)
        at = 0 if padding_side == "right" else pad
        for k, i in enumerate(group):
            flat = flats[i]
            m = len(flat.ids)
            row["input_ids"] += flat.ids
            row["labels"] += flat.labels
            row["attention_mask"] += [1] * m
            row["position_ids"] += range(m)
            row["sequence_ids"] += [k] * m
            # Payloads in reading order (row by row, position by position): the order the model fills
            # the slots in.
            for seg in flat.encoded:
                payloads.setdefault(seg.encoder, []).append(seg)
            for name, start, n in flat.slots:
                slot_rows, slot_positions = owners.setdefault(name, ([], []))
                slot_rows += [r] * n
                slot_positions += range(at + start, at + start + n)
            at += m
        for key, fill in zip(ROW_FIELDS, (pad_token_id, 0, 0, IGNORE_INDEX, -1), strict=True):
            padding = [fill] * pad
            columns[key].append(row[key] + padding if padding_side == "right" else padding + row[key])
    rows = {key: torch.tensor(values, dtype=torch.long) for key, values in columns.items()}
    return rows, payloads, owners


def _encoder_batch(
    config,
    payloads: dict[str, list[EncodedSegment]],
    owners: dict[str, tuple[list[int], list[int]]],
    shape: tuple[int, int],
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """Each encoder's payloads collated by its modality, and the [B, T] map of the slots they fill (`owners`:
    each encoder's slot rows and positions)."""
    # The model's encoder order, so that encoders run in the same order whatever order a batch meets them.
    names = [spec["name"] for spec in config.encoders if spec["name"] in payloads]
    slots = {name: torch.zeros(shape, dtype=torch.bool) for name in names}
    for name in names:
        rows, positions = owners.get(name, ([], []))
        slots[name][torch.tensor(rows, dtype=torch.long), torch.tensor(positions, dtype=torch.long)] = True
    encoder_inputs: dict[str, dict[str, torch.Tensor]] = {}
    for name in names:
        spec = config.encoder_spec(name)
        encoder_inputs[name] = get_modality(spec["kind"]).collate(spec, payloads[name])
    return encoder_inputs, slots


def _transcripts(segments: Sequence[EncodedSegment], weight: float) -> dict[str, torch.Tensor]:
    """What each of one encoder's payloads says (its untrained `target_ids`), padded, and the loss weight."""
    said = [seg.target_ids if (seg.target_ids and not seg.loss) else [] for seg in segments]
    ids = torch.zeros((len(said), max(1, *map(len, said))), dtype=torch.long)
    for i, tokens in enumerate(said):
        ids[i, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
    lengths = torch.tensor([len(t) for t in said], dtype=torch.long)
    return {"ids": ids, "lengths": lengths, "weight": torch.tensor(float(weight))}


def to_device(batch: Any, device: torch.device | str) -> Any:
    """`batch` with every tensor in it (nested dicts too: `encoder_inputs`, `encoder_slots`) on `device`."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {key: to_device(value, device) for key, value in batch.items()}
    return batch
