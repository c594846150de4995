"""Frozen-feature cache (`run.feature_cache`): training step time with and without it, on the quickstart.

Two settings, each on the preset's data (default configs/quickstart.yaml: its streams and weights,
`mix: batch`, its batch size):

- `preset`: the preset's model as configured (the quickstart: MiniLM and EfficientNet-Lite0 both frozen,
  so the cache keeps their whole outputs);
- `encoders' last 2 layers training`: the same with each encoder's `trainable_layers: 2` (the cache keeps
  the frozen layers below them; the quickstart's setting before 2026-12-01).

The micro-batches are drawn once (the input pipeline is `benchmarks/data_pipeline.py`'s subject). A first
pass over them with the cache attached fills it; then every micro-batch is trained on three times: without
the cache (the frozen lower layers computed, the path the cache replaces), with a cold cache (every row
computed, hashed and written to disk: the first epoch's cost) and with the warm one (every row a hit),
in an order rotated step by step so that drift on a shared machine hits all three alike. Ratios are of
mean step times, and (robust to a spike from another job) the median of each micro-batch's own ratio. A step is the
trainer's own `train_step` (forward, backward, AdamW step); the forward pass alone (no gradients) is
timed too, without and with the warm cache.

`--hit-rate-steps N` also counts, without running the model, what share of the rows a real run of N
steps of the preset would find in the cache (each image, span and question is looked up by content).

    OMP_NUM_THREADS=1 python benchmarks/feature_cache.py                 # 24 micro-batches per setting
    OMP_NUM_THREADS=2 python benchmarks/feature_cache.py --threads 2 --hit-rate-steps 1000
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from collections import defaultdict

import torch
from accelerate import Accelerator

from metalm.data.segments import to_device
from metalm.modalities import get_modality
from metalm.model.feature_cache import CacheStats, FeatureCache, row_key
from metalm.training.config import load_config
from metalm.training.data import build_data
from metalm.training.optimizer import build_optimizer
from metalm.training.step import train_step


def timed_step(model, batch: dict, optimizer, accelerator, device: str) -> float:
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    train_step(model, [to_device(batch, device)], optimizer, accelerator)
    sync()
    return time.perf_counter() - start


PATHS = ("no cache", "cold cache", "warm cache")


def build_model(cfg, trainable_layers: int | None, device: str):
    """The preset's model, or with every encoder's `trainable_layers` set to the given number."""
    cfg = cfg.model_copy(deep=True)
    if trainable_layers is not None:
        for encoder in cfg.model.encoders:
            encoder.trainable_layers = trainable_layers
    torch.manual_seed(cfg.run.seed)
    model, processor = cfg.model.to_recipe().build()
    return model.to(device).train(), processor, cfg


def run_setting(
    cfg, trainable_layers: int | None, batches: list[tuple[str, dict]], device: str, folder: str
) -> dict:
    """Step times of one setting without the cache, with a cold one and with a warm one, interleaved."""
    model, processor, cfg = build_model(cfg, trainable_layers, device)
    accelerator = Accelerator(cpu=device == "cpu")
    optimizer = build_optimizer(model, cfg.optim)  # the trainer's AdamW over the trainable parameters
    warm = FeatureCache(f"{folder}/warm", preprocessors=processor.preprocessors)
    # Cold: no memory layer, its folder emptied before each step, so every row is computed and written.
    cold = FeatureCache(f"{folder}/cold", memory_mb=0, preprocessors=processor.preprocessors)
    timed_step(model, batches[0][1], optimizer, accelerator, device)  # warm-up, uncached
    names = warm.attach(model)
    start = time.perf_counter()
    for name in names:  # once per run: hashing the frozen weights
        warm.fingerprint(model.encoders[name])
    fingerprint_s = time.perf_counter() - start
    for name in names:
        cold.fingerprint(model.encoders[name])
    for _, batch in batches:  # the first pass fills the warm cache
        timed_step(model, batch, optimizer, accelerator, device)
    warm.stats = CacheStats()
    steps: dict[str, list[float]] = {path: [] for path in PATHS}
    forwards: dict[str, list[float]] = {path: [] for path in PATHS}
    per_stream: dict[str, dict[str, list[float]]] = defaultdict(lambda: {path: [] for path in PATHS})
    for k, (stream, batch) in enumerate(batches):
        for path in PATHS[k % 3 :] + PATHS[: k % 3]:  # rotated, so drift hits every path alike
            if path == "no cache":
                FeatureCache.detach(model)
            else:
                shutil.rmtree(cold.directory, ignore_errors=True)
                (cold if path == "cold cache" else warm).attach(model)
            took = timed_step(model, batch, optimizer, accelerator, device)
            steps[path].append(took)
            per_stream[stream][path].append(took)
            if path != "cold cache":
                forwards[path].append(timed_forward(model, batch, device))
    out: dict = {"encoders cached": names, "fingerprint s (once)": round(fingerprint_s, 2)}
    for path in PATHS:
        out[f"{path} ms/step"] = round(1000 * statistics.mean(steps[path]), 1)
    out["step speed-up, warm cache"] = ratio(steps, "warm cache")
    out["step speed-up, cold cache"] = ratio(steps, "cold cache")
    # Robust to a spike from another job: each micro-batch's own ratio, the median over them.
    for path in ("warm cache", "cold cache"):
        out[f"median per-step speed-up, {path}"] = round(
            statistics.median(a / b for a, b in zip(steps["no cache"], steps[path])), 2
        )
    out["per stream, step speed-up (warm)"] = {name: ratio(t, "warm cache") for name, t in per_stream.items()}
    for path in ("no cache", "warm cache"):
        out[f"{path} forward ms"] = round(1000 * statistics.mean(forwards[path]), 1)
    out["forward speed-up, warm cache"] = ratio(forwards, "warm cache")
    out["warm lookups"] = warm.stats.as_dict()
    out["cold lookups"] = cold.stats.as_dict()
    return out


def ratio(seconds: dict[str, list[float]], path: str) -> float:
    """Mean time without the cache over mean time on `path` (> 1: the cache is faster)."""
    return round(statistics.mean(seconds["no cache"]) / statistics.mean(seconds[path]), 2)


def timed_forward(model, batch: dict, device: str) -> float:
    """The forward pass alone (train mode, no gradients)."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    inputs = to_device(batch, device)
    sync()
    start = time.perf_counter()
    with torch.no_grad():
        model(**inputs)
    sync()
    return time.perf_counter() - start


def run_hit_rate(cfg, processor, steps: int) -> dict:
    """Share of encoder rows a run of `steps` steps finds in the cache (seen before, by content)."""
    train, _ = build_data(cfg.data, processor, batch_size=cfg.optim.batch_size, seed=cfg.run.seed)
    seen: dict[str, set[str]] = defaultdict(set)
    rows: dict[str, list[int]] = defaultdict(lambda: [0, 0])  # encoder -> [rows, hits]
    for _ in range(steps * cfg.optim.grad_accum):
        batch = train.next_batch()
        for name, payload in batch["encoder_inputs"].items():
            spec = processor.config.encoder_spec(name)
            for inputs in get_modality(spec["kind"]).row_inputs(spec, payload):
                key = row_key(inputs)
                rows[name][0] += 1
                rows[name][1] += key in seen[name]
                seen[name].add(key)
    return {name: {"rows": n, "hit_rate": round(hits / n, 3)} for name, (n, hits) in rows.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/quickstart.yaml")
    ap.add_argument("--steps", type=int, default=24, help="micro-batches per setting")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--hit-rate-steps", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = load_config(args.config)
    torch.manual_seed(cfg.run.seed)
    _, processor = cfg.model.to_recipe().build()
    train, _ = build_data(cfg.data, processor, batch_size=cfg.optim.batch_size, seed=cfg.run.seed)
    batches = []
    for _ in range(args.steps):
        batch = train.next_batch()
        batches.append(("+".join(sorted({name for name, _ in train.last_sources})), batch))
    out: dict = {
        "device": torch.cuda.get_device_name()
        if device == "cuda"
        else f"cpu ({torch.get_num_threads()} threads)",
        "config": args.config,
        "micro_batches": args.steps,
        "streams": dict(sorted((s, sum(n == s for n, _ in batches)) for s, _ in batches)),
        "batch_size": cfg.optim.batch_size,
    }
    with tempfile.TemporaryDirectory() as folder:
        # The preset (the quickstart: both encoders frozen) and its encoders' last 2 layers training (the
        # cache then keeps only the frozen layers below them).
        for name, layers in (("preset", None), ("encoders' last 2 layers training", 2)):
            out[name] = run_setting(cfg, layers, batches, device, f"{folder}/{name}")
    if args.hit_rate_steps:
        out[f"hit rate over a {args.hit_rate_steps}-step run"] = run_hit_rate(
            cfg, processor, args.hit_rate_steps
        )
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
