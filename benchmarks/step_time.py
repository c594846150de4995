"""A preset's training step against another's on the same micro-batches: where the time goes, and the ratio.

Both configs' models train on micro-batches drawn by the first config's own plan (from ``--from-step``, so
that the late phase's mix can be timed), with the frozen encoders' feature cache warm; the two are timed
step by step in alternating order, so that drift on a shared machine hits both alike. It prints each
stream's step time for both, their mean over the drawn mix and the ratio, and the first config's busiest
operators (torch.profiler) so that what the step spends on matrix products, attention and the rest is
seen. The configs must share their data and encoders (e.g. a decoder's width changed): only the model
differs. Only time is measured here; what a change costs the model is a training run's to say.

    OMP_NUM_THREADS=2 python benchmarks/step_time.py --config configs/ablations/quickstart-wide.yaml \
        --compare configs/quickstart.yaml
"""

from __future__ import annotations

import argparse
import collections
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


def drawn_batches(cfg, processor, count: int, from_step: int) -> list[tuple[str, dict]]:
    """`count` micro-batches as the plan draws them from step `from_step`, each with its stream's name."""
    train, _ = build_data(cfg.data, processor, batch_size=cfg.optim.batch_size, seed=cfg.run.seed)
    for _ in range(from_step):
        train.plan_batch()
    out = []
    for _ in range(count):
        batch = train.next_batch()
        (name,) = {stream for stream, _ in train.last_sources}
        out.append((name, batch))
    return out


class Trainee:
    """One config's model, optimizer and feature cache, stepping on given micro-batches."""

    def __init__(self, path: str, cache_dir: str) -> None:
        self.cfg = load_config(path)
        torch.manual_seed(self.cfg.run.seed)
        self.model, self.processor = self.cfg.model.to_recipe().build()
        self.model.train()
        self.optimizer = build_optimizer(self.model, self.cfg.optim)
        self.accelerator = Accelerator(cpu=True)
        FeatureCache(cache_dir, preprocessors=self.processor.preprocessors).attach(self.model)

    def step(self, batch: dict) -> float:
        start = time.perf_counter()
        train_step(self.model, [to_device(batch, "cpu")], self.optimizer, self.accelerator, max_grad_norm=1.0)
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/quickstart.yaml", help="the baseline")
    parser.add_argument("--compare", required=True, help="the config timed against it")
    parser.add_argument("--batches", type=int, default=30, help="micro-batches drawn and timed")
    parser.add_argument("--from-step", type=int, default=1100, help="where in the plan to draw them")
    parser.add_argument("--ops", type=int, default=12, help="busiest operators listed")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as cache_dir:
        base, other = Trainee(args.config, cache_dir), Trainee(args.compare, cache_dir)
        batches = drawn_batches(base.cfg, base.processor, args.batches, args.from_step)
        for _, batch in batches:  # fills the cache and warms up both: untimed
            base.step(batch)
            other.step(batch)
        seconds: dict[str, dict[str, list[float]]] = {"base": collections.defaultdict(list),
                                                      "other": collections.defaultdict(list)}  # fmt: skip
        for i, (name, batch) in enumerate(batches):
            order = [("base", base), ("other", other)]
            for label, trainee in order if i % 2 else reversed(order):
                seconds[label][name].append(trainee.step(batch))
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _, batch in batches:
                base.step(batch)
    print(f"{args.batches} micro-batches drawn from step {args.from_step} of {args.config}'s plan, "
          f"{torch.get_num_threads()} threads")  # fmt: skip
    print(f"{'stream':<28}{'n':>4}{'base ms':>10}{'compare ms':>12}{'ratio':>8}")
    for name in seconds["base"]:
        b, o = statistics.mean(seconds["base"][name]), statistics.mean(seconds["other"][name])
        print(f"{name:<28}{len(seconds['base'][name]):>4}{b * 1000:>10.0f}{o * 1000:>12.0f}{b / o:>7.2f}x")
    total = {label: sum(map(sum, per.values())) / args.batches for label, per in seconds.items()}
    print(f"{'mean over the drawn mix':<32}{total['base'] * 1000:>10.0f}{total['other'] * 1000:>12.0f}"
          f"{total['base'] / total['other']:>7.2f}x")  # fmt: skip
    print(f"\n{args.config}'s busiest operators over the same micro-batches:")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.ops))


if __name__ == "__main__":
    main()
