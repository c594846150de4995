"""The segment and payload types: what a sample is made of, below every encoder kind.

This module imports nothing of metalm, so the modality plugins (`metalm.modalities`) can build segments
without importing the collator (`metalm.data.segments`), which consults them.

- `TextSegment`: decoder tokens, embedded by the decoder itself;
- `EncodedSegment`: a payload for one named encoder, whatever its kind's plugin reads (a text span in the
  encoder's vocabulary, an image's pixels, a clip's log-mel features). It fills as many decoder slots as
  its connector emits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = [
    "IGNORE_INDEX",
    "EncodedSegment",
    "InputError",
    "Sample",
    "SampleError",
    "Segment",
    "TextSegment",
]

IGNORE_INDEX = -100


@dataclass
class TextSegment:
    """Causal decoder tokens. `loss=False` for prompt text that is read but not trained on."""

    ids: list[int]
    loss: bool = True


@dataclass(init=False)
class EncodedSegment:
    """A payload for encoder `encoder`, read by the plugin of its kind alone. `target_ids` are a text span
    in the decoder's vocabulary; with `loss=True` its first token is the target at the slot before the
    segment.

    A plugin may give its payload a name by passing it under that name (`EncodedSegment(name,
    input_ids=ids)`, `pixel_values=...`): `seg.<that name>` then reads the payload back, and any other name
    reads None, so a reader can ask `seg.input_ids` of any segment. `payload=` leaves it unnamed."""

    encoder: str
    payload: Any
    payload_name: str
    target_ids: list[int] | None
    loss: bool

    def __init__(
        self,
        encoder: str,
        *,
        payload: Any = None,
        target_ids: list[int] | None = None,
        loss: bool = True,
        **named_payload: Any,
    ) -> None:
        if len(named_payload) > 1 or (named_payload and payload is not None):
            raise TypeError(f"an encoded segment has one payload, got {sorted(named_payload)} and payload")
        self.encoder, self.target_ids, self.loss = encoder, target_ids, loss
        self.payload_name, self.payload = next(iter(named_payload.items()), ("payload", payload))

    def __getattr__(self, name: str) -> Any:
        # Only reached for names that are not attributes: a payload name this segment does not use.
        if name.startswith("_") or "payload_name" not in self.__dict__:
            raise AttributeError(name)
        return self.payload if name == self.payload_name else None


Segment = TextSegment | EncodedSegment
Sample = list[Segment]


class SampleError(ValueError):
    """A sample cannot be collated; the message names the sample and segment."""


class InputError(ValueError):
    """Bad user input; the message names the sample and the part."""
