"""Sharded streaming data at scale: a WebDataset of 1,000,000 tiny image-text pairs (64x64 JPEGs, 100 tar
shards, the img2dataset layout) against one of 10,000 pairs (also 100 shards).

For each size, ``metalm train`` runs (a subprocess, the quickstart model, one stream of the pairs, batch 64,
3 steps) and is measured: seconds from the process start to its first optimizer step (the first row of
``metrics.jsonl``) and its peak resident memory (``VmHWM``). Then the loader alone: training micro-batches
of 64 pairs built in this process on one core (``time.process_time``), against what a quickstart step
consumes (64 samples per ≈ 0.39 s step, docs/training.md).

    OMP_NUM_THREADS=1 python benchmarks/data_scale.py [--root /tmp/metalm-data-scale] [--sizes 10000 1000000]

Generating the 1M shards takes a few minutes and ~4 GB of disk; they are kept in ``--root`` and reused.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # tests.shard_data writes the shards

from tests.shard_data import write_webdataset  # noqa: E402

SHARDS = 100
BATCH = 64
QUICKSTART_STEP_S = 0.39  # docs/training.md: quickstart step, batch 64, warm cache


def shards_for(root: Path, size: int) -> str:
    folder = root / f"pairs-{size}"
    if not (folder / f"{SHARDS - 1:05d}.tar").is_file():
        start = time.perf_counter()
        write_webdataset(folder, SHARDS, size // SHARDS)
        print(f"wrote {size:,} pairs in {SHARDS} shards to {folder} in {time.perf_counter() - start:.0f} s")
    return str(folder / f"{{00000..{SHARDS - 1:05d}}}.tar")


def train_config(source: str, output_dir: Path) -> dict:
    quickstart = yaml.safe_load((REPO / "src/metalm/configs/quickstart.yaml").read_text())
    return {
        "model": quickstart["model"],
        "data": {"streams": [{"name": "pairs", "source": source}], "seq_len": 64},
        "optim": {"lr": 1e-3, "max_steps": 3, "batch_size": BATCH},
        "run": {
            "output_dir": str(output_dir),
            "log_every": 1,
            "eval_batches": 0,
            "save_every": 0,
            "tensorboard": False,
            "mixed_precision": "no",
        },
    }


def peak_rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def measure_train(source: str, work: Path) -> dict:
    """`metalm train` for 3 steps: seconds to the first optimizer step, peak RSS, total seconds."""
    work.mkdir(parents=True, exist_ok=True)
    out = work / "run"
    shutil.rmtree(out, ignore_errors=True)  # its metrics.jsonl is the clock
    config = work / "config.yaml"
    config.write_text(yaml.safe_dump(train_config(source, out)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO / "src")}
    start = time.perf_counter()
    with open(work / "train.log", "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "metalm.cli", "train", str(config)], env=env, stdout=log, stderr=log
        )
        first_step, peak = None, 0.0
        while proc.poll() is None:
            peak = max(peak, peak_rss_mb(proc.pid) or 0.0)
            metrics = out / "metrics.jsonl"
            if first_step is None and metrics.is_file() and metrics.read_text().strip():
                first_step = time.perf_counter() - start
            time.sleep(0.05)
    if proc.returncode:
        raise RuntimeError(f"metalm train failed; see {work / 'train.log'}")
    return {"first_step_s": first_step, "peak_rss_mb": peak, "total_s": time.perf_counter() - start}


def measure_loader(source: str, batches: int = 20) -> dict:
    """Micro-batches of 64 pairs built in this process (one core): samples per CPU second."""
    import torch

    from metalm.training.config import DataConfig, load_config
    from metalm.training.data import build_data

    torch.set_num_threads(1)
    processor = load_config(str(REPO / "src/metalm/configs/quickstart.yaml")).model.to_recipe().build()[1]
    data = DataConfig(streams=[{"name": "pairs", "source": source}], seq_len=64)
    train, _ = build_data(data, processor, batch_size=BATCH, seed=0)
    start = time.perf_counter()
    train.take(2)  # opens the shards
    first = time.perf_counter() - start
    cpu = time.process_time()
    train.take(batches)
    per_s = batches * BATCH / (time.process_time() - cpu)
    consumed = BATCH / QUICKSTART_STEP_S
    return {"first_batches_s": first, "samples_per_cpu_s": per_s, "x_quickstart_step": per_s / consumed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default="/tmp/metalm-data-scale")
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 1_000_000])
    args = parser.parse_args()
    root = Path(args.root)
    results = {}
    for size in args.sizes:
        source = shards_for(root, size)
        results[size] = measure_train(source, root / f"train-{size}")
        print(f"{size:>9,} pairs: {json.dumps(results[size])}", flush=True)
    largest = max(args.sizes)
    loader = measure_loader(shards_for(root, largest))
    print(f"loader ({largest:,} pairs): {json.dumps(loader)}")
    if len(results) > 1:
        smallest = min(args.sizes)
        growth = results[largest]["peak_rss_mb"] - results[smallest]["peak_rss_mb"]
        print(f"peak RSS {largest:,} vs {smallest:,} pairs: {growth:+.0f} MB")


if __name__ == "__main__":
    main()
