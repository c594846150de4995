"""The global sample sequence as a plan: which stream, record or text window, and RNG counter each row of
each global micro-batch gets, without building a single sample.

A row of the sequence is a :class:`Row`: the stream it is drawn from (mixing draw ``d`` of micro-batch
``b`` picks stream ``choose(d, b)``, a pure function of seed, split, ``d`` and the streams whose ``steps``
hold ``b``'s optimizer step), the stream's sample counter (it seeds the row's
RNG), and either one record (captions, VQA, instruction samples) or the pieces of a packed text window.
Each stream reads its records in a seeded permutation per epoch. Text documents are packed into windows
in reading order; where a window starts depends on the lengths of the documents before it, so the walk
asks for token *counts* (``length``), never for samples. Walking a row costs a few integer operations, so
every process (and every loader worker) walks the whole global sequence and builds only its own rows.

What a row cannot say is whether its sample turns out unusable (a bad record, nothing left to train on):
that is found by whoever builds the row and settled there (see ``metalm.training.data``), so the plan
never depends on it.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["Plan", "Row", "StreamWalk"]


@dataclass(frozen=True)
class Row:
    """One row of the global sequence. ``record``: the record of a one-record sample; ``pieces``: a text
    window's ``(record, start, end)`` token ranges in order (``record`` is then None)."""

    stream: int
    counter: int
    record: int | None = None
    pieces: tuple[tuple[int, int, int], ...] = ()


class StreamWalk:
    """One stream's reading position: epoch, cursor in the epoch's order, sample counter, and the text
    window being filled (the document in progress and the pieces taken so far)."""

    def __init__(
        self,
        name: str,
        n_records: int,
        *,
        seed: int,
        split: str,
        window: int,
        packs: Callable[[int], bool],
        length: Callable[[int], int],
        weights: list[float] | None = None,
    ) -> None:
        self.name = name
        self.n_records = n_records
        self.seed = seed
        self.split = split
        self.window = window  # tokens per packed window
        self.packs = packs  # does this record go into text windows?
        self.length = length  # its token count (EOS included)
        # Per-record sampling weights (``balance``): an epoch is then n weighted draws with replacement.
        self.cum_weights = list(itertools.accumulate(weights)) if weights is not None else None
        self.epoch = 0
        self.cursor = 0
        self.samples = 0
        self.doc: int | None = None
        self.offset = 0
        self.pieces: list[list[int]] = []
        self._order_epoch = -1
        self._order: list[int] = []

    def order(self, epoch: int) -> list[int]:
        """The record indices of `epoch`, in reading order: a seeded permutation, or with weights seeded
        weighted draws (the same everywhere)."""
        if epoch != self._order_epoch:
            rng = random.Random(f"{self.seed}:{self.split}:{self.name}:order:{epoch}")
            if self.cum_weights is not None:
                order = rng.choices(range(self.n_records), cum_weights=self.cum_weights, k=self.n_records)
            else:
                order = list(range(self.n_records))
                rng.shuffle(order)
            self._order, self._order_epoch = order, epoch
        return self._order

    def _next_record(self) -> int:
        if self.cursor >= self.n_records:
            self.epoch, self.cursor = self.epoch + 1, 0
        idx = self.order(self.epoch)[self.cursor]
        self.cursor += 1
        return idx

    def next_row(self, stream: int) -> Row:
        """The stream's next row: its next one-record sample, or its next full text window."""
        while True:
            if self.doc is None:
                idx = self._next_record()
                if not self.packs(idx):
                    self.samples += 1
                    return Row(stream, self.samples - 1, record=idx)
                self.doc, self.offset = idx, 0
            # The same cut as pack_documents: a document continues into the next window.
            filled = sum(end - start for _, start, end in self.pieces)
            n = self.length(self.doc)
            take = min(n - self.offset, self.window - filled)
            self.pieces.append([self.doc, self.offset, self.offset + take])
            self.offset += take
            if self.offset >= n:
                self.doc, self.offset = None, 0
            if filled + take == self.window:
                pieces = tuple((d, s, e) for d, s, e in self.pieces)
                self.pieces = []
                self.samples += 1
                return Row(stream, self.samples - 1, pieces=pieces)

    def state(self) -> dict[str, Any]:
        return {
            "records": self.n_records,
            "weighted": self.cum_weights is not None,
            "epoch": self.epoch,
            "cursor": self.cursor,
            "samples": self.samples,
            "doc": self.doc,
            "offset": self.offset,
            "pieces": [list(p) for p in self.pieces],
        }

    def load(self, state: dict[str, Any]) -> None:
        if state["records"] != self.n_records:
            raise ValueError(
                f"stream {self.name!r}: the checkpoint was taken with {state['records']} records, "
                f"the data now has {self.n_records}; cannot resume the data position"
            )
        weighted = self.cum_weights is not None
        if state.get("weighted", False) != weighted:  # a state from before weights: none
            raise ValueError(
                f"stream {self.name!r}: the checkpoint read its records {_reading(not weighted)}, this run "
                f"reads them {_reading(weighted)} (balance); keep the setting to resume the data position"
            )
        self.epoch, self.cursor, self.samples = state["epoch"], state["cursor"], state["samples"]
        self.doc, self.offset = state["doc"], state["offset"]
        self.pieces = [list(p) for p in state["pieces"]]


def _drawn_at(steps: tuple[int, int | None] | None, step: int) -> bool:
    return steps is None or (steps[0] <= step and (steps[1] is None or step < steps[1]))


def _reading(weighted: bool) -> str:
    return "weighted (balanced)" if weighted else "in shuffled order"


class Plan:
    """The global micro-batches as rows: ``rows_per_batch`` (= batch_size × world_size) rows each, the
    stream drawn per row (``mix="sample"``) or per batch (``mix="batch"``, where a stream may have a number
    of rows of its own). Counts the global statistics that do not depend on building: samples, batches,
    samples per stream."""

    def __init__(
        self,
        walks: list[StreamWalk],
        weights: list[float],
        *,
        seed: int,
        split: str,
        mix: str,
        steps: list[tuple[int, int | None] | None] | None = None,
        grad_accum: int = 1,
    ) -> None:
        self.walks = walks
        self.weights = weights
        self.seed = seed
        self.split = split
        self.mix = mix
        # Each stream's optimizer steps [start, end) (None: all; end None: to the end); a step is `grad_accum` micro-batches.
        self.steps = steps or [None] * len(walks)
        self.grad_accum = grad_accum
        self.draws = 0
        self.samples = 0
        self.batches = 0
        self.per_stream = dict.fromkeys((w.name for w in walks), 0)

    def choose(self, draw: int, batch: int = 0) -> int:
        """The stream index of mixing draw number `draw` in micro-batch `batch` (a pure function of seed,
        draw and the streams drawn in that batch's optimizer step)."""
        step = batch // self.grad_accum
        weights = [w if _drawn_at(s, step) else 0.0 for w, s in zip(self.weights, self.steps)]
        if not any(weights):
            raise ValueError(f"no stream is drawn in step {step}: their steps: [start, end] leave it out")
        if len(self.walks) == 1:
            return 0
        # The ":0:" is where a rank used to be (one sequence per rank); kept so a seed gives the data it
        # gave before.
        rng = random.Random(f"{self.seed}:{self.split}:mix:0:{draw}")
        return rng.choices(range(len(self.walks)), weights=weights)[0]

    def _draw(self, batch: int) -> int:
        self.draws += 1
        return self.choose(self.draws - 1, batch)

    def _row(self, k: int) -> Row:
        self.samples += 1
        self.per_stream[self.walks[k].name] += 1
        return self.walks[k].next_row(k)

    def next_row(self, batch: int | None = None) -> Row:
        """The next row, with a draw of its own (mixing per sample), in micro-batch `batch` (default: the
        next one)."""
        return self._row(self._draw(self.batches if batch is None else batch))

    def next_batch(self, rows: int | list[int]) -> list[Row]:
        """The rows of the next global micro-batch: `rows` of them, or (``mix="batch"``) ``rows[k]`` when it
        is drawn from stream ``k``."""
        batch = self.batches
        self.batches += 1
        if self.mix == "batch":
            k = self._draw(batch)
            return [self._row(k) for _ in range(rows if isinstance(rows, int) else rows[k])]
        if not isinstance(rows, int):
            if len(set(rows)) != 1:
                raise ValueError(f"rows per stream {rows} differ: that needs mix='batch'")
            rows = rows[0]
        return [self.next_row(batch) for _ in range(rows)]

    def state(self) -> dict[str, Any]:
        return {
            "draws": self.draws,
            "samples": self.samples,
            "batches": self.batches,
            "per_stream": dict(self.per_stream),
            "walks": {w.name: w.state() for w in self.walks},
        }

    def load(self, state: dict[str, Any]) -> None:
        self.draws, self.samples, self.batches = state["draws"], state["samples"], state["batches"]
        self.per_stream = dict(state["per_stream"])
        for w in self.walks:
            w.load(state["walks"][w.name])
