"""k-shot evaluation with and without the feature cache (`metalm eval --feature-cache`, the default).

A k-shot prompt encodes each of its demonstrations' images and questions as well as the query's, so with
k = 4 the frozen encoders run five times per question. Served from the feature cache, every image and span
seen before (the demonstrations are training examples, whose features training cached) is read instead.
This evaluates a saved model on easy-VQA with `--shots` demonstrations, ``--per-type`` questions of each
type, three ways, in the same run: without the cache, with an empty one (every row computed and written:
what a first evaluation of a model trained without `run.feature_cache` costs) and with the cache that
filled, alternating the uncached and warm runs `--repeats` times so that drift hits both alike. It prints
each one's wall time, the ratio, and how many predictions differ from the uncached ones (they may, rarely:
a row encoded alone and in a batch can round differently).

    OMP_NUM_THREADS=2 python benchmarks/eval_feature_cache.py --model runs/quickstart/final
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from metalm.evaluation.experiments import load_model
from metalm.evaluation.runner import evaluate
from metalm.model.feature_cache import FeatureCache, cache_features


def predictions(out: Path) -> list[str]:
    rows = []
    for path in sorted(out.rglob("predictions-*.jsonl")):
        rows += [json.loads(line)["prediction"] for line in path.read_text().splitlines() if line]
    return rows


def timed(model, processor, args: argparse.Namespace, out: Path) -> tuple[float, list[str]]:
    start = time.perf_counter()
    evaluate(
        model, processor, "easyvqa", shots=(args.shots,), seeds=(0,), per_group=args.per_type,
        batch_size=32, out_dir=out, progress=False,
    )  # fmt: skip
    return time.perf_counter() - start, predictions(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="runs/quickstart/final", help="a saved MetaLM folder")
    p.add_argument("--shots", type=int, default=4)
    p.add_argument("--per-type", type=int, default=50, help="easy-VQA questions of each type")
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.model}, k = {args.shots}")

    model, processor = load_model(Path(args.model))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        cold_s, plain = timed(model, processor, args, root / "plain-0")  # also warms what is not cached
        cache = cache_features(model, processor, root / "cache")
        if cache is None:
            raise SystemExit(f"{args.model}: no encoder has a frozen part; nothing to cache")
        fill_s, _ = timed(model, processor, args, root / "fill")
        times: dict[str, list[float]] = {"without the cache": [], "warm cache": []}
        differ = 0
        for r in range(args.repeats):
            FeatureCache.detach(model)
            t, got = timed(model, processor, args, root / f"plain-{r + 1}")
            times["without the cache"].append(t)
            cache.attach(model)
            t, got = timed(model, processor, args, root / f"warm-{r}")
            times["warm cache"].append(t)
            differ += sum(a != b for a, b in zip(plain, got))
    base = statistics.fmean(times["without the cache"])
    print("\n| evaluation | s | vs without the cache |\n|---|---:|---:|")
    print(f"| without the cache (first run, not counted) | {cold_s:.1f} | |")
    print(f"| empty cache (computed and written) | {fill_s:.1f} | {base / fill_s:.2f}x |")
    for name, values in times.items():
        mean = statistics.fmean(values)
        print(f"| {name} (mean of {len(values)}) | {mean:.1f} | {base / mean:.2f}x |")
    print(f"\npredictions differing from the uncached run's: {differ} of {len(plain) * args.repeats}")


if __name__ == "__main__":
    main()
