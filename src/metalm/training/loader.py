"""The training batches through a ``torch.utils.data.DataLoader``: worker processes build them (tokenising,
decoding images, collating) off the training thread.

Each worker holds its own copy of the :class:`~metalm.training.data.DataStream` and walks the whole plan
(:mod:`metalm.training.plan`: integers only), building micro-batch ``n`` only when ``n % num_workers`` is
its id; the DataLoader hands the workers' batches back in turn, so the batches are the ones
``num_workers=0`` gives, in the same order. With each batch comes the plan position after it and what
building found (:class:`~metalm.training.data.Tally`: truncations, bad records, warnings); the training
process takes both in as it consumes the batch, so its ``DataStream`` is where the training is (not where
the workers' prefetching is): a checkpoint's ``data.json`` resumes exactly, and bad records are counted
and logged there, once each.

With ``num_workers=0`` the DataLoader calls ``DataStream.next_batch`` in the training process.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from metalm.training.data import DataStream, Tally

__all__ = ["Batch", "BatchDataset", "BatchLoader"]


@dataclass
class Batch:
    """One micro-batch for this rank: the collated inputs, (stream, records) per real row, and, from a
    worker, the plan position after this batch and what building it found."""

    inputs: dict[str, Any]
    sources: list[tuple[str, list[int]]]
    plan: dict[str, Any] | None = None
    tally: Tally | None = None


class BatchDataset(IterableDataset):
    """This rank's micro-batches from the stream's current position, endless."""

    def __init__(self, stream: DataStream) -> None:
        self.stream = stream

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        stream = self.stream  # in a worker: that worker's own copy
        if info is None:
            while True:
                inputs = stream.next_batch()
                yield Batch(inputs, list(stream.last_sources))
        n = 0
        while True:
            planned = stream.plan_batch()
            if n % info.num_workers == info.id:
                inputs = stream.build_batch(planned)
                yield Batch(inputs, list(stream.last_sources), stream.plan.state(), stream.ctx.tally.drain())
            n += 1


def _as_is(batch: Batch) -> Batch:
    # The batch is collated already; the default would convert it again.
    return batch


class BatchLoader:
    """The training loop's batch source over `stream`: ``next()`` gives the next :class:`Batch` and moves
    `stream` to just after it. Start it once the stream is where training continues (after a resume);
    ``close()`` stops the workers."""

    def __init__(self, stream: DataStream, num_workers: int = 0) -> None:
        self.stream = stream
        self.num_workers = num_workers
        self.loader = DataLoader(
            BatchDataset(stream),
            batch_size=None,
            collate_fn=_as_is,
            num_workers=num_workers,
            # Two batches ahead per worker (DataLoader's default): enough to hide a batch's build time.
            prefetch_factor=2 if num_workers else None,
            # Its own generator: starting an iterator draws a seed, which from the global RNG would move
            # the dropout masks of a resumed run. The batches themselves draw on no torch RNG.
            generator=torch.Generator().manual_seed(0),
        )
        self._it: Iterator[Batch] | None = None

    def next(self) -> Batch:
        if self._it is None:
            self._it = iter(self.loader)
        batch = next(self._it)
        if batch.plan is not None:  # built in a worker: catch up with it
            self.stream.plan.load(batch.plan)
            self.stream.last_sources = batch.sources
            self.stream.absorb(batch.tally)
        return batch

    def close(self) -> None:
        """Stop the workers (an unfinished iterator holds them)."""
        self._it = None
