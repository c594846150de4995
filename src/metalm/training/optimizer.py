"""The optimizer and learning-rate schedule of a training run."""

from __future__ import annotations

from typing import Any

import torch

from metalm.training.config import OptimConfig

__all__ = ["build_optimizer", "build_scheduler", "param_groups"]


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters only; no weight decay on biases and norm weights (1-D tensors)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or name.endswith(".bias") or "norm" in name.lower():
            no_decay.append(p)
        else:
            decay.append(p)
    if not decay and not no_decay:
        raise ValueError("the model has no trainable parameters (everything is frozen)")
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: torch.nn.Module, optim: OptimConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters of `model`, as `optim` configures it."""
    groups = param_groups(model, optim.weight_decay)
    return torch.optim.AdamW(
        groups, lr=optim.lr, betas=optim.betas, eps=optim.eps, fused=_can_fuse(groups) or None
    )


def _can_fuse(groups: list[dict[str, Any]]) -> bool:
    """The fused AdamW kernel (one pass over all parameters) where it applies: plain floating-point tensors
    on one CPU or CUDA device. On CPU it cut the quickstart's optimizer step about 4x (docs/benchmarks.md);
    sharded (DTensor) or mixed-device parameters keep the default implementation."""
    params = [p for g in groups for p in g["params"]]
    devices = {p.device for p in params}
    return (
        len(devices) == 1
        and next(iter(devices)).type in ("cpu", "cuda")
        and all(type(p) is torch.nn.Parameter and p.dtype.is_floating_point for p in params)
    )


def build_scheduler(optimizer: torch.optim.Optimizer, optim: OptimConfig) -> Any:
    """Linear warm-up over `optim.warmup_steps`, then `optim.schedule` (transformers' schedules): linear or
    cosine decay to 0 at `optim.max_steps`, constant, or wsd (constant until the last `decay_steps`, then
    linear to 0).

    Stepped once per optimizer step by :func:`metalm.training.step.train_step` (not through accelerate,
    which would step it once per process): `max_steps` counts optimizer steps."""
    from transformers import get_scheduler
    from transformers.optimization import get_wsd_schedule

    if optim.schedule == "wsd":
        return get_wsd_schedule(
            optimizer,
            num_warmup_steps=optim.warmup_steps,
            num_decay_steps=optim.wsd_decay_steps,
            num_training_steps=optim.max_steps,
            decay_type="linear",
        )
    name = {"constant": "constant_with_warmup"}.get(optim.schedule, optim.schedule)
    return get_scheduler(
        name, optimizer, num_warmup_steps=optim.warmup_steps, num_training_steps=optim.max_steps
    )
