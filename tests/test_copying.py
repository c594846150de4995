"""The copy probe (metalm.evaluation.copying): what it scores, and that it tells copying from not copying."""

from __future__ import annotations

import random

import pytest

import metalm.evaluation.copying as copying
from metalm.data.segments import TextSegment


def test_random_tokens_are_ordinary_words(tiny):
    _, processor = tiny
    ids = copying.random_token_ids(processor, 50, random.Random(0))
    assert len(ids) == 50 and not set(ids) & set(processor.tokenizer.all_special_ids)
    assert all(processor.tokenizer.decode([i]).strip().lstrip("#").isalpha() for i in ids)


def test_the_repeat_is_scored_after_the_same_tokens(tiny, monkeypatch):
    """A fake scorer that copies perfectly: it gives the repeat no loss exactly when the sample shows the
    same tokens, unscored, right before them; the probe must report that as copying."""
    model, processor = tiny
    seen = []

    def fake_score(model, processor, samples):
        out = []
        for sample in samples:
            seen.append(sample)
            scored = [s for s in sample if isinstance(s, TextSegment) and s.loss]
            shown = [
                s
                for s in sample
                if isinstance(s, TextSegment) and not s.loss and s.ids != [processor.bos_token_id]
            ]
            copied = bool(shown) and shown[-1].ids == scored[-1].ids
            out.append((0.0 if copied else -5.0 * len(scored[-1].ids), len(scored[-1].ids), copied))
        return out

    monkeypatch.setattr(copying, "score_samples", fake_score)
    result = copying.copy_probe(model, processor, sequences=6, length=5, batch_size=4)
    assert result["first_loss"] == pytest.approx(5.0) and result["repeat_loss"] == 0.0
    assert len(seen) == 12 and all(len(s[-1].ids) == 5 for s in seen)


def test_a_random_model_does_not_copy(tiny):
    model, processor = tiny
    result = copying.copy_probe(model, processor, sequences=8, length=6, batch_size=8)
    assert result == copying.copy_probe(model, processor, sequences=8, length=6, batch_size=8)  # seeded
    assert abs(result["first_loss"] - result["repeat_loss"]) < 0.5


def test_the_copy_training_probe_trains_a_copy_and_leaves_the_model(tiny_saved, tmp_path):
    """scripts/copy_training_probe.py: the curve is written, the saved model is untouched."""
    import json
    from pathlib import Path

    from tests.conftest import load_script

    module = load_script("copy_training_probe")
    before = {p.name: p.stat().st_mtime_ns for p in Path(tiny_saved).iterdir()}
    out = tmp_path / "curve.json"
    args = [
        "--model",
        str(tiny_saved),
        "--steps",
        "4",
        "--log-every",
        "2",
        "--vocab",
        "20",
        "--out",
        str(out),
    ]
    assert module.main(args) == 0
    result = json.loads(out.read_text())
    assert [c["step"] for c in result["curve"]] == [2, 4] and result["chance_loss"] == pytest.approx(
        2.9957, abs=1e-3
    )
    assert {p.name: p.stat().st_mtime_ns for p in Path(tiny_saved).iterdir()} == before
    assert module.main([*args, "--fresh"]) == 0 and json.loads(out.read_text())["fresh"] is True
    assert {p.name: p.stat().st_mtime_ns for p in Path(tiny_saved).iterdir()} == before


def test_the_copy_training_probe_saves_the_trained_model_to_a_new_folder(tiny_saved, tmp_path):
    """--save writes a loadable model whose decoder is the trained one (the encoders untouched), with a
    manifest that verifies; a folder that exists is refused, not overwritten."""
    import torch

    from metalm.evaluation.experiments import load_model
    from metalm.model.loading import check_model_folder
    from tests.conftest import load_script

    module = load_script("copy_training_probe")
    saved = tmp_path / "copy-trained"
    assert (
        module.main(["--model", str(tiny_saved), "--steps", "3", "--vocab", "20", "--save", str(saved)]) == 0
    )
    check_model_folder(saved)
    (before, _), (after, _) = load_model(tiny_saved), load_model(saved)
    old, new = before.state_dict(), after.state_dict()
    changed = {k for k in old if not torch.equal(old[k], new[k])}
    assert changed and all(k.startswith("decoder.") for k in changed)
    with pytest.raises(SystemExit):
        module.main(["--model", str(tiny_saved), "--steps", "1", "--save", str(saved)])
