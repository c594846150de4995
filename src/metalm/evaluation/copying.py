"""Does the decoder copy? Random token sequences, each shown twice as plain decoder tokens: the loss on the
first showing is what no context predicts, the loss on the repeat is what copying from context brings.

A decoder with induction heads (Olsson et al. 2022) predicts the repeat almost perfectly; one without them
scores the repeat like the first showing. In-context learning of a made-up name (fast binding) is copying
with a fuzzy match: the name that followed the demonstration whose image resembles the query's. A decoder
that does not even copy an exact repeat has nothing to build binding on, and this probe says so in seconds.
"""

from __future__ import annotations

import random
import statistics
from typing import Any

from metalm.data.processor import MetaLMProcessor
from metalm.data.segments import TextSegment
from metalm.evaluation.scoring import score_samples

__all__ = ["copy_probe", "random_token_ids"]


def random_token_ids(processor: MetaLMProcessor, n: int, rng: random.Random) -> list[int]:
    """``n`` ordinary tokens drawn uniformly: ids that decode to letters only, no special token."""
    tokenizer = processor.tokenizer
    special = set(tokenizer.all_special_ids)
    vocab = len(tokenizer)
    out: list[int] = []
    while len(out) < n:
        i = rng.randrange(vocab)
        if i not in special and tokenizer.decode([i]).strip().lstrip("#").isalpha():
            out.append(i)
    return out


def copy_probe(
    model,
    processor: MetaLMProcessor,
    *,
    sequences: int = 64,
    length: int = 16,
    batch_size: int = 16,
    seed: int = 0,
) -> dict[str, Any]:
    """Mean loss (nats a token) on the first showing and on the repeat of ``sequences`` random sequences of
    ``length`` tokens."""
    rng = random.Random(f"metalm-copy-probe/{seed}")
    bos = [TextSegment([processor.bos_token_id], loss=False)] if processor.bos_token_id is not None else []
    first: list[float] = []
    repeat: list[float] = []
    for start in range(0, sequences, batch_size):
        seqs = [random_token_ids(processor, length, rng) for _ in range(min(batch_size, sequences - start))]
        shown_once = score_samples(model, processor, [[*bos, TextSegment(s, loss=True)] for s in seqs])
        shown_twice = score_samples(
            model, processor, [[*bos, TextSegment(s, loss=False), TextSegment(s, loss=True)] for s in seqs]
        )
        first += [-total / n for total, n, _ in shown_once]
        repeat += [-total / n for total, n, _ in shown_twice]
    return {
        "first_loss": statistics.fmean(first),
        "repeat_loss": statistics.fmean(repeat),
        "sequences": sequences,
        "length": length,
        "seed": seed,
    }
