"""Sequence packing (`data.pack`): real decoder positions per second, packed vs padded, on the quickstart.

The quickstart's data (configs/quickstart.yaml: its streams and weights, batch 16, seq_len 128) is drawn
from the same seed under both mixes (`mix: batch`, the quickstart's: one stream per micro-batch;
`mix: sample`: streams mixed within a micro-batch), each padded (each row one sample, padded to the
longest row of its micro-batch) and packed (`data.pack`: the micro-batch's samples first-fit into rows of
at most seq_len); a mix's two layouts hold the same samples in the same micro-batches. The quickstart model then trains on them with the trainer's
own `train_step` (forward, backward, AdamW step), the layouts interleaved step by step so that drift on
a shared machine hits both alike. Batches are built before timing (the input pipeline is
`benchmarks/data_pipeline.py`'s subject).

Real positions = attention-mask positions (text tokens and encoded slots, no padding); the padding
fraction is the share of the decoder's B × T positions that are padding.

    OMP_NUM_THREADS=1 python benchmarks/packing.py               # 40 micro-batches per layout, CPU
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from accelerate import Accelerator

from metalm.data.segments import to_device
from metalm.training.config import load_config
from metalm.training.data import build_data
from metalm.training.step import train_step


def draw(cfg, processor, mix: str, pack: bool, steps: int) -> list[dict]:
    cfg.data.mix, cfg.data.pack = mix, pack
    train, _ = build_data(cfg.data, processor, batch_size=cfg.optim.batch_size, seed=cfg.run.seed)
    return train.take(steps)


def shape_stats(batches: list[dict]) -> tuple[int, int]:
    """(real positions, B × T positions) over `batches`."""
    real = sum(int(b["attention_mask"].sum()) for b in batches)
    total = sum(b["input_ids"].numel() for b in batches)
    return real, total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/quickstart.yaml")
    ap.add_argument("--steps", type=int, default=40, help="micro-batches per layout")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    cfg = load_config(args.config)
    torch.manual_seed(cfg.run.seed)
    model, processor = cfg.model.to_recipe().build()
    model.to(device).train()
    if not model.supports_packing():
        raise SystemExit("this decoder does not keep packed samples apart")
    baseline = f"mix={cfg.data.mix} padded"
    layouts = {
        f"mix={mix} {'packed' if pack else 'padded'}": draw(cfg, processor, mix, pack, args.steps)
        for mix in dict.fromkeys([cfg.data.mix, "batch", "sample"])
        for pack in (False, True)
    }
    accelerator = Accelerator(cpu=device == "cpu")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step(batch: dict) -> float:
        sync()
        start = time.perf_counter()
        train_step(model, [to_device(batch, device)], optimizer, accelerator)
        sync()
        return time.perf_counter() - start

    for batches in layouts.values():  # warm-up: one step of each
        step(batches[0])
    seconds = dict.fromkeys(layouts, 0.0)
    for k in range(args.steps):  # interleaved, so that drift on a shared machine hits all layouts alike
        for name, batches in layouts.items():
            seconds[name] += step(batches[k])

    out: dict = {
        "device": torch.cuda.get_device_name()
        if device == "cuda"
        else f"cpu ({torch.get_num_threads()} threads)",
        "config": args.config,
        "micro_batches_per_layout": args.steps,
        "batch_size": cfg.optim.batch_size,
        "seq_len": cfg.data.seq_len,
    }
    rates = {}
    for name, batches in layouts.items():
        real, total = shape_stats(batches)
        rates[name] = real / seconds[name]
        out[name] = {
            "rows": sum(b["input_ids"].shape[0] for b in batches),
            "positions": total,
            "real_positions": real,
            "padding_fraction": round(1 - real / total, 3),
            "seconds": round(seconds[name], 2),
            "real_positions_per_s": round(rates[name], 1),
            f"vs {baseline}": round(rates[name] / rates[baseline], 3),
        }
        if name.endswith("packed"):
            padded = name.replace("packed", "padded")
            assert out[padded]["real_positions"] == real  # the same samples in both layouts
            out[name]["vs padded, same mix"] = round(rates[name] / rates[padded], 3)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
