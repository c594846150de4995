"""The "does the decoder read the encoder" probe: three conditions, labels on the continuation only."""

from __future__ import annotations

import math

import pytest
import torch

from metalm.data.segments import IGNORE_INDEX
from metalm.evaluation.reads_encoder import condition_samples, reads_encoder_losses

DOCS = [
    "the quick brown fox jumps over the lazy dog and runs into the forest where it hides for the night",
    "stock markets rose on monday as investors welcomed news of lower inflation and steady growth rates",
    "too short",
]


def test_only_the_continuation_carries_labels(tiny):
    _, processor = tiny
    span, rest = processor.tokenize("one two three"), processor.tokenize("four five")
    samples = condition_samples(processor, "text", span, rest)
    for cond, sample in samples.items():
        labels = processor.collate([sample])["labels"][0]
        assert labels[labels != IGNORE_INDEX].tolist() == rest, cond
    assert "text" in processor.collate([samples["encoded"]])["encoder_inputs"]
    assert not processor.collate([samples["plain"]])["encoder_inputs"]


def test_losses_match_a_direct_computation(tiny):
    model, processor = tiny
    out = reads_encoder_losses(model, processor, DOCS, span_tokens=6, continuation_tokens=5, progress=False)
    assert out["documents"] == 2 and out["skipped"] == 1
    # "removed" by hand: BOS + continuation through the bare decoder, mean NLL of the continuation.
    nll = []
    for text in DOCS[:2]:
        ids = processor.tokenize(text)
        seq = torch.tensor([[processor.bos_token_id, *ids[6:11]]])
        with torch.no_grad():
            logp = torch.log_softmax(model.decoder(input_ids=seq).logits[0, :-1], -1)
        nll += [-float(logp[i, t]) for i, t in enumerate(seq[0, 1:].tolist())]
    assert out["loss"]["removed"] == pytest.approx(sum(nll) / len(nll), rel=1e-4)
    assert out["loss"]["encoded"] != pytest.approx(out["loss"]["removed"])
    assert out["perplexity"]["plain"] == pytest.approx(math.exp(out["loss"]["plain"]))
