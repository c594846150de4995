"""Where an evaluation's per-example records live: ``predictions-<task>-k<k>-s<seed>.jsonl`` in its output
folder, one file per task, number of demonstrations and seed. The runner writes them; the breakdowns, the
in-context tables, the quickstart's report and the reuse check of ``cached_eval`` read or remove them, all
through these functions, so the name is spelled once and seeds come back in numeric order (``s2`` before
``s10``, which a sorted glob puts the other way round)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

__all__ = ["prediction_files", "prediction_path", "read_predictions"]

_NAME = re.compile(r"^predictions-(?P<task>.+)-k(?P<k>\d+)-s(?P<seed>\d+)\.jsonl$")


def prediction_path(out: str | Path, task: str, k: int, seed: int) -> Path:
    """The file of ``task``'s records at ``k`` demonstrations and demonstration seed ``seed`` in ``out``."""
    return Path(out) / f"predictions-{task}-k{k}-s{seed}.jsonl"


def prediction_files(out: str | Path, task: str, k: int | None = None) -> list[Path]:
    """``task``'s prediction files in ``out`` (at ``k`` demonstrations, or at every k), ordered by k, then
    seed, numerically. Only ``task``'s own: another task whose name starts with it is not matched."""
    found = []
    for path in Path(out).glob(f"predictions-{task}-k*-s*.jsonl"):
        match = _NAME.match(path.name)
        if match and match["task"] == task and (k is None or int(match["k"]) == k):
            found.append((int(match["k"]), int(match["seed"]), path))
    return [path for _, _, path in sorted(found)]


def read_predictions(path: str | Path) -> list[dict[str, Any]]:
    """The records of one predictions JSONL file."""
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
