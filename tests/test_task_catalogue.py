"""The built-in task catalogue keeps every task's protocol: templates, scoring, metric, splits, options and
what its loader and episode hook make of the data. ``tests/data/builtin_task_protocols.json`` was written
from the catalogue as it stood before it became a data table (``python tests/test_task_catalogue.py``
rewrites it; only do that for a deliberate protocol change).

The loaders read a fake ``load_builtin`` (records with every attribute any loader reads), so the check needs
no data set, speech included."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from metalm.evaluation.tasks import BUILTIN_TASKS, Example, Task, builtin_task

FIXTURE = Path(__file__).parent / "data" / "builtin_task_protocols.json"
_NOT_PROTOCOL = {"name", "load", "episodes", "_cache"}
# Six colours and three shapes, each more than once: enough classes for every fast-binding episode.
_CAPTIONS = tuple(
    f"a {color} {shape}."
    for color in ("red", "blue", "green", "teal", "brown", "gray")
    for shape in ("circle", "triangle")
)


def _fake_records(dataset: str, split: str, kind: str | None = None) -> list[SimpleNamespace]:
    """Records of every kind at once; even ones without an id (the loaders' fallback ids)."""
    return [
        SimpleNamespace(
            id=None if i % 2 == 0 else f"{dataset}/{split}/{i}",
            text=_CAPTIONS[i % len(_CAPTIONS)] + ("  spaced\n words" if i == 3 else ""),
            question=f"q{i}?",
            answers=[("red", "circle", "yes")[i % 3], f"a{i}"],  # an easy-VQA answer: its question type
            image=f"/img/{dataset}/{i}.png",
            audio=f"/wav/{dataset}/{i}.wav",
            label=f"label{i % 3}",
        )
        for i in range(2 * len(_CAPTIONS))
    ]


def _example(ex: Example) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(ex).items()}


def protocol(task: Task) -> dict[str, Any]:
    """Everything a task does besides its name: its fields, its examples per split, one episode."""
    out: dict[str, Any] = {
        f.name: getattr(task, f.name) for f in dataclasses.fields(task) if f.name not in _NOT_PROTOCOL
    }
    out = json.loads(json.dumps(out))  # tuples as lists, as the fixture holds them
    loaded = {split: task.load(split) for split in ("train", "test")}
    out["examples"] = {split: [_example(e) for e in examples[:4]] for split, examples in loaded.items()}
    out["example_counts"] = {split: len(examples) for split, examples in loaded.items()}
    out["episode"] = None
    if task.episodes is not None:
        pool = task.load("train")
        demos, query = task.episodes(task.load("test")[0], pool, 1, 3, 2)
        out["episode"] = {"demos": [_example(d) for d in demos], "query": _example(query)}
    return out


def all_protocols() -> dict[str, dict[str, Any]]:
    return {name: protocol(builtin_task(name)) for name in BUILTIN_TASKS}


@pytest.fixture
def fake_builtin(monkeypatch: pytest.MonkeyPatch) -> None:
    import metalm.data.builtin as builtin

    monkeypatch.setattr(builtin, "load_builtin", _fake_records)


def test_every_builtin_task_keeps_its_protocol(fake_builtin: None) -> None:
    expected = json.loads(FIXTURE.read_text(encoding="utf-8"))
    assert list(BUILTIN_TASKS) == list(expected), "task names or their order changed"
    for name, want in expected.items():
        got = protocol(builtin_task(name))
        for key in want:
            assert got[key] == want[key], f"{name}: {key} changed"
        assert set(got) == set(want), f"{name}: protocol keys changed"


def test_builtin_tasks_are_fresh_and_named() -> None:
    for name in BUILTIN_TASKS:
        first, second = builtin_task(name), builtin_task(name)
        assert first.name == name and first is not second


if __name__ == "__main__":  # rewrite the fixture from the current catalogue
    import metalm.data.builtin as _builtin

    _builtin.load_builtin = _fake_records  # type: ignore[assignment]
    FIXTURE.write_text(json.dumps(all_protocols(), indent=1) + "\n", encoding="utf-8")
    print(f"wrote {FIXTURE} ({len(BUILTIN_TASKS)} tasks)", file=sys.stderr)


def test_caption_task_asks_the_shared_caption_instruction() -> None:
    from metalm.data.layouts import CAPTION_INSTRUCTION

    assert builtin_task("easyvqa-caption").input_template == CAPTION_INSTRUCTION


def test_a_bad_table_entry_names_file_task_and_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from metalm.evaluation import catalogue
    from metalm.evaluation.tasks import TaskError

    def catalogue_of(text: str) -> None:
        (tmp_path / "image.yaml").write_text(text, encoding="utf-8")
        monkeypatch.setattr(catalogue, "CATALOGUE_DIR", tmp_path)
        monkeypatch.setattr(catalogue, "FAMILIES", ("image",))
        catalogue.catalogue.cache_clear()
        try:
            catalogue.catalogue()
        finally:
            catalogue.catalogue.cache_clear()

    good = "tasks:\n  t:\n    examples: {reader: caption, dataset: d}\n    input_template: ''\n"
    catalogue_of(good)  # reads
    with pytest.raises(TaskError, match=r"image.yaml: task 't': scorng: Extra inputs"):
        catalogue_of(good + "    scorng: rank\n")
    with pytest.raises(TaskError, match=r"task 't': examples.media: Input should be 'image' or 'audio'"):
        catalogue_of(good.replace("dataset: d", "dataset: d, media: video"))
    with pytest.raises(TaskError, match=r"task 't': entry: Value error, give input_template"):
        catalogue_of(good.replace("    input_template: ''\n", ""))
    with pytest.raises(TaskError, match=r"image.yaml: task 't': metric must be one of"):  # the Task's checks
        catalogue_of(good + "    metric: bleu\n")


def test_eval_help_lists_every_builtin_task(capsys: pytest.CaptureFixture[str]) -> None:
    from metalm.cli import main

    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    listed = "".join(capsys.readouterr().out.split())  # argparse wraps lines at hyphens
    for name in BUILTIN_TASKS:
        assert name in listed
