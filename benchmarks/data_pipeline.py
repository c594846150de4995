"""Building one process's training micro-batches of the quickstart data, CPU time (``time.process_time``)
per micro-batch; no model step. Two measurements:

- ``--part ranks``: 1 process × batch 16 against rank 0 of 2 × batch 8 (the same global micro-batch), with
  and without ``skip_bad``, over the first 100 micro-batches and the next 100.
- ``--part streams`` (the default): the quickstart preset as shipped (its batch size), per stream, with the
  processor's memo of tokenised short texts (``MetaLMProcessor.tokenize``) and without it, interleaved
  batch by batch on two copies of the same data; the first ``--warm`` micro-batches fill each copy's
  caches as a long run would, the next ``--batches`` are timed.

    OMP_NUM_THREADS=1 python benchmarks/data_pipeline.py [--part ranks|streams]
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch

import metalm.data.processor as processor_module
from metalm.training.config import load_config
from metalm.training.data import build_data


def ranks(processor, cfg) -> None:
    for skip_bad in (False, True):
        cfg.data.skip_bad = skip_bad
        for world, batch_size in ((1, 16), (2, 8)):
            train, _ = build_data(cfg.data, processor, batch_size=batch_size, seed=0, world_size=world)
            times = []
            for _ in range(2):
                start = time.process_time()
                train.take(100)
                times.append((time.process_time() - start) * 10)  # ms per micro-batch
            print(
                f"skip_bad={skip_bad} world={world} batch={batch_size}: "
                f"{times[0]:.1f} / {times[1]:.1f} ms CPU per micro-batch (first 100 / next 100)"
            )


def _timed_build(stream, rows, memo: bool) -> float:
    """CPU seconds to build `rows`, the token memo on or off (its size limit 0 turns it off)."""
    entries = processor_module.TOKEN_MEMO_ENTRIES
    if not memo:
        processor_module.TOKEN_MEMO_ENTRIES = 0
    try:
        start = time.process_time()
        stream.build_batch(rows)
        return time.process_time() - start
    finally:
        processor_module.TOKEN_MEMO_ENTRIES = entries


def streams(cfg, warm: int, batches: int) -> None:
    builds = {}
    for memo in (True, False):  # a processor (and token memo) of each copy's own
        processor = cfg.model.to_recipe().build()[1]
        builds[memo] = build_data(cfg.data, processor, batch_size=cfg.optim.batch_size, seed=0)[0]
    times: dict[tuple[str, bool], list[float]] = defaultdict(list)
    for n in range(warm + batches):
        for memo, stream in builds.items():
            rows = stream.plan_batch()
            seconds = _timed_build(stream, rows, memo)
            if n >= warm:
                times[stream.names[rows[0].stream], memo].append(seconds)
    print("| stream | micro-batches | memo: ms CPU | no memo: ms CPU | ratio |\n|---|---:|---:|---:|---:|")
    total = {True: 0.0, False: 0.0}
    for name in builds[True].names:
        with_memo, without = times.get((name, True), []), times.get((name, False), [])
        if not with_memo:
            continue
        total[True] += sum(with_memo)
        total[False] += sum(without)
        a, b = 1000 * sum(with_memo) / len(with_memo), 1000 * sum(without) / len(without)
        print(f"| {name} | {len(with_memo)} | {a:.1f} | {b:.1f} | {b / a:.2f}x |")
    print(
        f"| all | {batches} | {1000 * total[True] / batches:.1f} | {1000 * total[False] / batches:.1f} | "
        f"{total[False] / total[True]:.2f}x |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=("ranks", "streams"), default="streams")
    parser.add_argument("--warm", type=int, default=300, help="micro-batches built before timing")
    parser.add_argument("--batches", type=int, default=300, help="micro-batches timed")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = load_config("configs/quickstart.yaml")
    if args.part == "ranks":
        ranks(cfg.model.to_recipe().build()[1], cfg)
    else:
        streams(cfg, args.warm, args.batches)


if __name__ == "__main__":
    main()
