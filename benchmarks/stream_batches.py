"""Streams with a batch size of their own (`data.streams[].batch_size`, `mix: batch`): a preset's training time
with some streams at sizes of their own against every stream at `optim.batch_size`, on this machine.

With `mix: batch` each micro-batch comes from one stream, drawn by weight, so a run's time is the sum over
streams of (share of the steps) x (that stream's step time). The script times the trainer's own `train_step`
(forward, backward, AdamW) on micro-batches of each stream at both settings, interleaved stream by stream so
that drift on a shared machine hits both alike, with the frozen encoders' feature cache warm (as after a
run's first epoch). It prints each stream's step time in both settings, its share of the steps (the plan's
own draws over the run's steps), and the expected seconds per step and for the whole run, with their ratio.
Only time is measured here: fewer rows are fewer examples, and what that costs the model is a training run's
to say (configs/quickstart.yaml's comment on its in-context rows).

    OMP_NUM_THREADS=2 python benchmarks/stream_batches.py --size vqa-in-context=16 --size news=32
    OMP_NUM_THREADS=2 python benchmarks/stream_batches.py --config my.yaml --size long-docs=8 --batches 6
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import tempfile
import time

import torch
from accelerate import Accelerator

from metalm.data.segments import to_device
from metalm.model.feature_cache import FeatureCache
from metalm.training.config import load_config
from metalm.training.data import build_data
from metalm.training.optimizer import build_optimizer
from metalm.training.step import train_step


def stream_batches(cfg, processor, sizes: dict[str, int], per_stream: int) -> dict[str, list[dict]]:
    """`per_stream` micro-batches of each stream, the streams named in `sizes` at those sizes."""
    data = cfg.data.model_copy(deep=True)
    for stream in data.streams:
        stream.batch_size = sizes.get(stream.name)
    train, _ = build_data(data, processor, batch_size=cfg.optim.batch_size, seed=cfg.run.seed)
    found: dict[str, list[dict]] = collections.defaultdict(list)
    while any(len(found[name]) < per_stream for name in train.names):
        batch = train.next_batch()
        (name,) = {stream for stream, _ in train.last_sources}
        if len(found[name]) < per_stream:
            found[name].append(batch)
    return found


def step_shares(cfg, processor, steps: int) -> dict[str, float]:
    """Each stream's share of `steps` micro-batches, from the plan's own draws (no batch is built): with
    `mix: batch` draw d is micro-batch d, so a stream's `steps: [start, end]` phase counts where it is drawn."""
    train, _ = build_data(cfg.data, processor, batch_size=cfg.optim.batch_size, seed=cfg.run.seed)
    batches = steps * cfg.optim.grad_accum
    counts = collections.Counter(train.names[train.choose(d, d)] for d in range(batches))
    return {name: counts[name] / batches for name in train.names}


def timed(model, batch: dict, optimizer, accelerator) -> float:
    start = time.perf_counter()
    train_step(model, [to_device(batch, "cpu")], optimizer, accelerator)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/quickstart.yaml")
    parser.add_argument(
        "--size", action="append", default=[], metavar="STREAM=ROWS", help="a stream's own size"
    )
    parser.add_argument("--batches", type=int, default=4, help="timed micro-batches per stream and setting")
    args = parser.parse_args()
    cfg = load_config(args.config)
    if cfg.data.mix != "batch":
        parser.error(f"{args.config}: streams have sizes of their own only with data.mix: batch")
    names = {stream.name for stream in cfg.data.streams}
    sizes = {name: int(rows) for name, _, rows in (item.partition("=") for item in args.size)}
    if not sizes or set(sizes) - names:
        parser.error(f"name streams and their rows, --size STREAM=ROWS; the streams are {sorted(names)}")
    torch.manual_seed(cfg.run.seed)
    model, processor = cfg.model.to_recipe().build()
    model.train()
    accelerator = Accelerator(cpu=True)
    optimizer = build_optimizer(model, cfg.optim)
    settings = {"own sizes": sizes, "optim.batch_size": {}}
    batches = {
        label: stream_batches(cfg, processor, chosen, args.batches + 1) for label, chosen in settings.items()
    }
    seconds: dict[str, dict[str, list[float]]] = {label: collections.defaultdict(list) for label in settings}
    with tempfile.TemporaryDirectory() as folder:
        FeatureCache(folder, preprocessors=processor.preprocessors).attach(model)
        for label in settings:  # the first batch of each stream fills the cache (and warms up): untimed
            for found in batches[label].values():
                timed(model, found[0], optimizer, accelerator)
        for i in range(1, args.batches + 1):
            for name in batches["own sizes"]:
                for label in settings if i % 2 else reversed(list(settings)):  # alternate the order
                    seconds[label][name].append(timed(model, batches[label][name][i], optimizer, accelerator))
    steps = cfg.optim.max_steps
    shares = step_shares(cfg, processor, steps)
    out: dict = {
        "config": args.config,
        "own sizes": sizes,
        "threads": torch.get_num_threads(),
        "steps": steps,
    }
    out["streams"] = {}
    per_step = dict.fromkeys(settings, 0.0)
    for name, share in shares.items():
        row = {"share of steps": round(share, 3)}
        for label in settings:
            mean = statistics.mean(seconds[label][name])
            rows = batches[label][name][1]["input_ids"].shape
            row[f"{label}: s/step"] = round(mean, 3)
            row[f"{label}: rows x positions"] = list(rows)
            per_step[label] += share * mean
        out["streams"][name] = row
    for label in settings:
        out[f"{label}: expected s/step"] = round(per_step[label], 3)
        out[f"{label}: expected training min"] = round(per_step[label] * steps / 60, 2)
    out["speed-up (optim.batch_size / own sizes)"] = round(
        per_step["optim.batch_size"] / per_step["own sizes"], 2
    )
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
