"""In-context rows (``format: in_context``, :mod:`metalm.training.episodes`): the part of a stream's sample
builder (:class:`~metalm.training.samples.RecordSamples`) that lays demonstrations and a query into one
window."""

from __future__ import annotations

import random
from typing import Any

from metalm.data.segments import Sample, TextSegment, sample_length
from metalm.training.episodes import EpisodeSampler, answer_of
from metalm.training.instructions import target_ids

__all__ = ["EpisodeRows"]


class EpisodeRows:
    """Mixed into :class:`~metalm.training.samples.RecordSamples`, whose records, config, build context,
    BOS, row length, episode sampler and one-record samples it reads."""

    records: Any
    config: Any
    ctx: Any
    bos: list[int]
    seq_len: int
    _episodes: EpisodeSampler | None
    record_weights: list[float] | None  # a balanced stream's per-record weights

    def _episode_sample(self, idx: int, rng: random.Random) -> tuple[Sample | None, list[int]]:
        """Demonstrations and the query ``idx`` in one window: each the stream's instruction sample, BOS only
        at the start, every answer trained (under relabelling, only answers whose word was shown before).
        A row that would not fit ``seq_len`` loses its earliest demonstrations. Also returns the records
        of the row in order (the query last)."""
        if self._episodes is None:
            self._episodes = EpisodeSampler(
                self.records, self.config.in_context, self._single_records(), self.record_weights
            )
        episode = self._episodes.draw(idx, rng)
        examples: list[tuple[int, Sample]] = []
        for j in (*episode.demonstrations, idx):
            sample = self._record_sample(j, rng, add_bos=False)
            if sample is None and j == idx:
                return None, [idx]
            if sample is not None:
                examples.append((j, sample))
        used, keep = len(self.bos), 0
        for _, sample in reversed(examples):  # the query and the latest demonstrations that fit
            n = sample_length(sample, self.ctx.config)
            if keep and used + n > self.seq_len:
                break
            used, keep = used + n, keep + 1
        row: Sample = [TextSegment(list(self.bos), loss=False)] if self.bos else []
        shown: set[str] = set()
        kept = examples[len(examples) - keep :]
        for j, sample in kept:
            if episode.words is not None and not (episode.other_question and j == idx):
                label = answer_of(self.records[j])
                sample = self._relabelled(sample, episode.words[label], trained=label in shown)
                shown.add(label)
            row += sample
        return row, [j for j, _ in kept]

    def _relabelled(self, sample: Sample, word: str, *, trained: bool) -> Sample:
        """``sample`` with its answer (the last, trained segment) replaced by ``word``."""
        return [*sample[:-1], TextSegment(target_ids(self.ctx.processor, word), loss=trained)]
