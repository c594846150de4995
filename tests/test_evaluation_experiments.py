"""Evaluation experiments' bookkeeping: a cached evaluation reused only for the same shots, seeds,
limit and options; a per-group subset that balances groups and keeps the old subsets; `train_once`
reusing a run only when it was trained from the config asked for."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from metalm.evaluation.tasks import Example

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny forwards: one thread (conftest.py)


def test_cached_eval_reuses_a_summary_only_for_the_same_shots_seeds_and_limit(tmp_path, monkeypatch):
    from metalm.evaluation import experiments, runner
    from metalm.evaluation.retrieval import SIMILARITY

    calls = []

    def fake_evaluate(model, processor, task, *, shots, seeds, out_dir, limit=None, **kw):
        calls.append((list(shots), list(seeds), limit))
        out_dir.mkdir(parents=True, exist_ok=True)
        names = [task] if isinstance(task, str) else task
        summary = {
            "shots": list(shots),
            "seeds": list(seeds),
            "limit": limit,
            "results": {n: {} for n in names},
        }
        summary["per_group"] = kw.get("per_group")
        summary["calibration"] = "content-free query (N/A), ranked tasks" if kw.get("calibrate") else None
        summary["demonstrations"] = SIMILARITY if kw.get("demonstrations") == "similar" else None
        (out_dir / "summary.json").write_text(json.dumps(summary))
        return summary

    monkeypatch.setattr(runner, "evaluate", fake_evaluate)
    out = tmp_path / "easyvqa"
    experiments.cached_eval(out, None, None, "easyvqa", [0, 4], [0, 1], limit=100)
    experiments.cached_eval(out, None, None, "easyvqa", [0, 4], [0, 1], limit=100)  # reused
    assert calls == [([0, 4], [0, 1], 100)]
    for shots, seeds, limit in (([0, 4], [0, 1], 500), ([0, 1, 4], [0, 1], 100), ([0, 4], [0], 100)):
        experiments.cached_eval(out, None, None, "easyvqa", shots, seeds, limit=limit)
        assert calls[-1] == (shots, seeds, limit)  # a different request is evaluated again
    assert len(calls) == 4
    experiments.cached_eval(out, None, None, "easyvqa", [0, 4], [0], limit=100, per_group=30)
    assert len(calls) == 5  # the same subset size, balanced per group: evaluated again
    experiments.cached_eval(out, None, None, "easyvqa", [0, 4], [0], limit=100, per_group=30, calibrate=True)
    assert len(calls) == 6  # calibrated: evaluated again
    experiments.cached_eval(out, None, None, "easyvqa", [0, 4], [0], limit=100, per_group=30, calibrate=True)
    assert len(calls) == 6
    similar = dict(limit=100, per_group=30, calibrate=True, demonstrations="similar")
    experiments.cached_eval(out, None, None, "easyvqa", [0, 4], [0], **similar)
    assert len(calls) == 7  # retrieved demonstrations: evaluated again
    experiments.cached_eval(out, None, None, "easyvqa", [0, 4], [0], **similar)
    assert len(calls) == 7
    both = ["easyvqa", "fastbind-shape-2way"]
    experiments.cached_eval(out, None, None, both, [0, 4], [0], **similar)
    assert len(calls) == 8  # a task the cached summary lacks: evaluated again
    experiments.cached_eval(out, None, None, both[:1], [0, 4], [0], **similar)
    assert len(calls) == 8  # one it holds: reused
    # Evaluated again, the asked task's older prediction files go first (a seed no longer asked must not be
    # read with the new ones); another task's stay.
    for name in ("predictions-easyvqa-k4-s2.jsonl", "predictions-other-k4-s0.jsonl"):
        (out / name).write_text("{}\n")
    experiments.cached_eval(out, None, None, "easyvqa", [0, 4], [0, 1], limit=100)
    assert len(calls) == 9 and sorted(p.name for p in out.glob("predictions-*")) == [
        "predictions-other-k4-s0.jsonl"
    ]


def test_a_subset_per_group_balances_groups_and_keeps_the_old_subsets():
    from metalm.evaluation.task_runs import SUBSET_SEED, subset_examples

    examples = [Example(str(i), {}, ("a",), group="rare" if i % 10 == 0 else "common") for i in range(200)]
    head = subset_examples(examples, 50)
    # --limit alone picks what it always picked (cached figures stay comparable).
    assert head == [examples[i] for i in sorted(random.Random(SUBSET_SEED).sample(range(200), 50))]
    balanced = subset_examples(examples, None, per_group=15)
    assert [e.group for e in balanced].count("rare") == 15 and len(balanced) == 30
    assert balanced == sorted(balanced, key=lambda e: int(e.id))  # the split's order
    assert subset_examples(examples, None, per_group=15) == balanced  # fixed, not per call
    assert len(subset_examples(examples, 20, per_group=15)) == 20
    assert [e.group for e in subset_examples(examples, None, per_group=500)].count("rare") == 20  # all of it
    for bad in ({"limit": 0}, {"limit": None, "per_group": 0}):
        with pytest.raises(ValueError, match="must be positive"):
            subset_examples(examples, **bad)


def test_train_once_reuses_a_run_only_when_it_was_trained_from_the_config_asked_for(tmp_path, monkeypatch):
    import yaml

    from metalm.evaluation import experiments
    from metalm.training import trainer
    from metalm.training.config_loading import config_to_dict

    trained = []

    def fake_train(config):  # what the trainer leaves behind: config.yaml and final/config.json
        out = Path(config.run.output_dir)
        (out / "final").mkdir(parents=True)
        (out / "final" / "config.json").write_text("{}")
        (out / "config.yaml").write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))
        trained.append(out)

    monkeypatch.setattr(trainer, "train", fake_train)
    config = Path("configs/gemma-vl-icl.yaml").resolve()
    run = tmp_path / "runs" / "gemma-vl-icl"
    first = experiments.train_once(config, run, [f"init_from={tmp_path}/runs/gemma-vl/final"])
    assert first == run / "final" and trained == [run]
    # The same config again, its init written another way (relative to here): reused, not retrained.
    monkeypatch.chdir(tmp_path)
    assert experiments.train_once(config, run, ["init_from=runs/gemma-vl/final"]) == first
    assert trained == [run]
    # Another first stage or other steps: an error that names what differs and what to do.
    with pytest.raises(RuntimeError) as err:
        experiments.train_once(config, run, ["init_from=runs/gemma-vl-yes-no/final", "optim.max_steps=7"])
    message = str(err.value)
    assert "init_from: " in message and "-> runs/gemma-vl-yes-no/final" in message
    assert "optim.max_steps: 200 -> 7" in message and f"Move or remove {run}" in message
    # A stream's setting deep in the list is named by its index.
    with pytest.raises(RuntimeError, match=r"data\.streams\.\d+\.weight: "):
        experiments.train_once(
            config, run, [f"init_from={tmp_path}/runs/gemma-vl/final", "data.streams.0.weight=9"]
        )
    # Logging settings do not make another model; a run without config.yaml is reused as before.
    assert (
        experiments.train_once(config, run, [f"init_from={tmp_path}/runs/gemma-vl/final", "run.log_every=1"])
        == first
    )
    # A run saved before a setting existed (no `other_question` where it is the default) counts it as such.
    saved = yaml.safe_load((run / "config.yaml").read_text())
    unset = [
        s["in_context"]
        for s in saved["data"]["streams"]
        if (s.get("in_context") or {}).get("other_question") == 0
    ]
    assert unset
    for settings in unset:
        del settings["other_question"]
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    assert experiments.train_once(config, run, [f"init_from={tmp_path}/runs/gemma-vl/final"]) == first
    (run / "config.yaml").unlink()
    assert experiments.train_once(config, run, ["init_from=elsewhere/final"]) == first
    assert trained == [run]
