"""Evaluation tasks: where :func:`get_task` finds one, and the names the rest of metalm imports.

* the protocol -- :class:`Example`, :class:`Task`, metrics -- is :mod:`metalm.evaluation.protocol`;
* built-in tasks (:data:`BUILTIN_TASKS`) are rows of a data table, ``configs/tasks/*.yaml``, read by
  :mod:`metalm.evaluation.catalogue`;
* user tasks come from a small YAML/JSON task file with a JSONL data file
  (:func:`load_task_file`, :mod:`metalm.evaluation.task_file`, ``docs/evaluation.md``).
"""

from __future__ import annotations

from pathlib import Path

from metalm.evaluation.catalogue import BUILTIN_TASKS, builtin_task
from metalm.evaluation.protocol import METRICS, Example, Task, TaskError, in_model_layout, with_overrides
from metalm.evaluation.task_file import load_task_file

__all__ = [
    "BUILTIN_TASKS",
    "METRICS",
    "Example",
    "Task",
    "TaskError",
    "builtin_task",
    "get_task",
    "in_model_layout",
    "load_task_file",
    "with_overrides",
]


def get_task(spec: str | Path | Task) -> Task:
    """A task from a built-in name, a task file path (.yaml / .yml / .json) or a :class:`Task`."""
    if isinstance(spec, Task):
        return spec
    text = str(spec)
    if text in BUILTIN_TASKS:
        return builtin_task(text)
    if Path(text).suffix.lower() in (".yaml", ".yml", ".json") or Path(text).is_file():
        return load_task_file(text)
    return builtin_task(text)  # raises with the list of names
