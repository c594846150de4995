"""A run's training micro-batches built by this working tree's code against a git revision's: the wall time
to build them, and whether they are the same batches.

Each version builds the config's micro-batches in a process of its own (``PYTHONPATH`` at its ``src``), in
the order the trainer asks for them (``DataStream.next_batch``: the plan's draws, every stream's phases),
with no model step; the versions alternate ``--repeats`` times so that drift on a shared machine hits both
alike. The revision's code is checked out into a temporary git worktree. Every tensor of every micro-batch is
hashed in order: equal digests mean the working tree builds exactly what the revision built.

    OMP_NUM_THREADS=2 python benchmarks/batch_building.py --against HEAD~1           # the quickstart's 1,400
    OMP_NUM_THREADS=2 python benchmarks/batch_building.py --against v0.3 --config configs/gemma-vl.yaml --batches 300
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _digest(value, h) -> None:
    import torch

    if isinstance(value, torch.Tensor):
        h.update(f"{value.dtype}{tuple(value.shape)}".encode())
        h.update(value.contiguous().numpy().tobytes())
    elif isinstance(value, dict):
        for key, item in value.items():
            h.update(str(key).encode())
            _digest(item, h)
    elif isinstance(value, list | tuple):
        for item in value:
            _digest(item, h)
    else:
        h.update(repr(value).encode())


def build_all(config: str, batches: int | None) -> dict:
    """Child: build the micro-batches with whichever metalm is on the path; time, per-stream time, digest."""
    from metalm.training.config import load_config
    from metalm.training.data import build_data

    cfg = load_config(config)
    processor = cfg.model.to_recipe().build()[1]
    train, _ = build_data(cfg.data, processor, batch_size=cfg.optim.batch_size, seed=cfg.run.seed)
    count = batches or cfg.optim.max_steps
    h = hashlib.sha256()
    per_stream: dict[str, list[float]] = collections.defaultdict(list)
    start = time.perf_counter()
    for _ in range(count):
        began = time.perf_counter()
        batch = train.next_batch()
        spent = time.perf_counter() - began
        per_stream["+".join(sorted({name for name, _ in train.last_sources}))].append(spent)
        _digest(batch, h)  # outside the timed part
    total = sum(sum(times) for times in per_stream.values())
    return {
        "batches": count,
        "seconds": round(total, 2),
        "wall incl. hashing": round(time.perf_counter() - start, 2),
        "ms per batch by stream": {
            k: round(1000 * statistics.mean(v), 1) for k, v in sorted(per_stream.items())
        },
        "digest": h.hexdigest(),
    }


def run_child(src: Path, config: str, batches: int | None) -> dict:
    env = {**os.environ, "PYTHONPATH": f"{src}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [sys.executable, __file__, "--child", "--config", config]
    cmd += ["--batches", str(batches)] if batches else []
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"building with {src} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", default="HEAD", help="the git revision to compare with (default HEAD)")
    parser.add_argument("--config", default="configs/quickstart.yaml")
    parser.add_argument("--batches", type=int, default=None, help="micro-batches (default optim.max_steps)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(build_all(args.config, args.batches)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "against"
        subprocess.run(
            ["git", "worktree", "add", "--detach", "-q", str(tree), args.against], cwd=ROOT, check=True
        )
        try:
            sources = {args.against: tree / "src", "working tree": ROOT / "src"}
            runs: dict[str, list[dict]] = {label: [] for label in sources}
            for i in range(args.repeats):
                for label in sources if i % 2 == 0 else reversed(list(sources)):
                    runs[label].append(run_child(sources[label], args.config, args.batches))
                    print(f"{label}: {runs[label][-1]['seconds']} s", file=sys.stderr, flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, check=False)
    seconds = {label: statistics.mean(r["seconds"] for r in found) for label, found in runs.items()}
    digests = {r["digest"] for found in runs.values() for r in found}
    out = {
        "config": args.config,
        "threads": os.environ.get("OMP_NUM_THREADS"),
        "runs": runs,
        "mean seconds": seconds,
        f"speed-up (the working tree against {args.against})": round(
            seconds[args.against] / seconds["working tree"], 2
        ),
        "same batches": len(digests) == 1,
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
