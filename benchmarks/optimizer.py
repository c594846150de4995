"""AdamW step: the default (for-each) implementation vs the fused kernel the trainer picks
(`metalm.training.optimizer.build_optimizer`), on a preset's trainable parameters.

The optimizer step is a fixed cost per step that does not shrink with the batch: on the quickstart
(11M-parameter decoder and connectors trained, encoders frozen and cached) it was the largest part of a
warm step on CPU. Both implementations step the same parameters with the same random gradients,
interleaved so that drift on a shared machine hits both alike; the script also checks that they give the
same parameters after the timed steps (within float tolerance).

    OMP_NUM_THREADS=2 python benchmarks/optimizer.py                          # the quickstart preset
    OMP_NUM_THREADS=2 python benchmarks/optimizer.py --config configs/paper-vl.yaml
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from metalm.training.config import load_config
from metalm.training.optimizer import param_groups


def timed_steps(optimizer: torch.optim.Optimizer, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        optimizer.step()
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/quickstart.yaml")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps per round and implementation")
    args = parser.parse_args()
    cfg = load_config(args.config)
    model, _ = cfg.model.to_recipe().build()
    twin = copy.deepcopy(model)
    torch.manual_seed(0)
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        if a.requires_grad:
            a.grad = torch.randn_like(a) * 1e-3
            b.grad = a.grad.clone()
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    opts = {
        "default": torch.optim.AdamW(param_groups(model, 0.01), lr=1e-4, fused=False),
        "fused": torch.optim.AdamW(param_groups(twin, 0.01), lr=1e-4, fused=True),
    }
    times: dict[str, list[float]] = {k: [] for k in opts}
    for opt in opts.values():
        timed_steps(opt, 2)  # warm-up: state allocation
    for _ in range(args.rounds):
        for name, opt in opts.items():
            times[name].append(timed_steps(opt, args.steps))
    drift = max(
        (a - b).abs().max().item() for a, b in zip(model.parameters(), twin.parameters(), strict=True)
    )
    med = {k: statistics.median(v) * 1000 for k, v in times.items()}
    print(f"{args.config}: {n / 1e6:.1f}M trainable parameters, {torch.get_num_threads()} threads")
    for name, ms in med.items():
        print(f"  {name:8s} {ms:7.1f} ms/step (median of {args.rounds} rounds of {args.steps})")
    print(
        f"  fused vs default: {med['default'] / med['fused']:.2f}x; largest parameter difference {drift:.2e}"
    )


if __name__ == "__main__":
    main()
