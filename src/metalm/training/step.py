"""One optimizer step: forward and backward over the micro-batches, clip, step.

Exactness across numbers of processes: each micro-batch's loss is normalised by the number of target
tokens of the *global* micro-batch (an all-reduced count passed as ``num_items_in_batch``) and multiplied by
the number of processes, so DDP's (and FSDP's) gradient averaging gives the gradient of the global mean.
2 processes × batch B then train like 1 process × batch 2B.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from metalm.training.parallel import is_fsdp

__all__ = ["AUX_LOSSES", "MicroBatch", "StepResult", "autocast", "train_step"]

# Losses the model returns beside `loss` (and includes in it), logged on their own lines.
AUX_LOSSES = ("transcript_loss", "typed_twin_loss")


@dataclass
class MicroBatch:
    """Model inputs (labels included) for one forward/backward; `rows`: how many rows are real samples
    (a filler row that FSDP needs comes after them and counts no tokens); None: all of them."""

    inputs: dict[str, Any]
    rows: int | None = None


@dataclass
class StepResult:
    """What one :func:`train_step` measured on this process (not reduced over processes)."""

    loss_sum: torch.Tensor  # the micro-batches' losses summed, float32, on the device
    micro_losses: list[torch.Tensor] = field(default_factory=list)  # each micro-batch's loss, detached
    tokens: int = 0  # attention-mask tokens of the real rows
    grad_norm: torch.Tensor | None = None  # before clipping; None when not measured
    # The model's auxiliary losses (AUX_LOSSES) of the micro-batches that returned them; part of `loss_sum`.
    aux_losses: dict[str, list[torch.Tensor]] = field(default_factory=dict)

    @property
    def loss(self) -> float:
        """The mean loss over the micro-batches."""
        return float(self.loss_sum) / max(len(self.micro_losses), 1)


def autocast(device_type: str, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """`torch.autocast` to `dtype`, or nothing when `dtype` is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=dtype)


def _global_target_count(labels: torch.Tensor, accelerator: Any) -> torch.Tensor:
    """Target tokens of the global micro-batch (every process's rows), as a float on the device."""
    # Counted where the labels are (no host sync), as a float of the default dtype.
    targets = (labels[:, 1:] != -100).sum().to(device=accelerator.device, dtype=torch.get_default_dtype())
    if accelerator.num_processes > 1:
        targets = accelerator.reduce(targets, reduction="sum")
    return targets


def _clip_and_step(
    model: torch.nn.Module, optimizer: Any, scheduler: Any, accelerator: Any, max_grad_norm: float | None
) -> torch.Tensor | None:
    grad_norm = None
    if max_grad_norm is not None:
        trainable = [p for p in model.parameters() if p.requires_grad]
        if is_fsdp(model):  # accelerate does not know the model was sharded (see parallel.py)
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, max_grad_norm)
            grad_norm = getattr(grad_norm, "full_tensor", lambda g=grad_norm: g)()
        else:
            grad_norm = accelerator.clip_grad_norm_(trainable, max_grad_norm)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def train_step(
    model: torch.nn.Module,
    micro_batches: Iterable[MicroBatch | dict[str, Any]],
    optimizer: Any,
    accelerator: Any,
    *,
    scheduler: Any = None,
    max_grad_norm: float | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> StepResult:
    """Accumulate gradients over `micro_batches` (read one at a time, so the caller may produce them
    lazily), then clip to `max_grad_norm` and step `optimizer` and `scheduler` once.

    `accelerator` (accelerate's) decides when gradients sync: give it as many micro-batches as its
    ``gradient_accumulation_steps``. ``max_grad_norm=math.inf`` measures the norm without clipping; None
    neither measures nor clips. `autocast_dtype`: autocast for a model accelerate did not wrap (FSDP)."""
    from accelerate.utils import send_to_device

    world = accelerator.num_processes
    result = StepResult(loss_sum=torch.zeros((), device=accelerator.device))
    for micro in micro_batches:
        if not isinstance(micro, MicroBatch):
            micro = MicroBatch(micro)
        result.tokens += int(micro.inputs["attention_mask"][: micro.rows].sum())
        targets = _global_target_count(micro.inputs["labels"], accelerator)
        batch = send_to_device(micro.inputs, accelerator.device)
        with accelerator.accumulate(model):
            with autocast(accelerator.device.type, autocast_dtype):
                out = model(**batch, num_items_in_batch=targets.clamp(min=1))
            # Times `world`: DDP and FSDP average gradients over processes (see the module docstring).
            loss = out.loss * world
            accelerator.backward(loss)
            result.loss_sum += loss.detach().float()
            result.micro_losses.append(loss.detach())
            for key in AUX_LOSSES:
                if out.get(key) is not None:
                    result.aux_losses.setdefault(key, []).append(out[key].detach().float())
            if accelerator.sync_gradients:
                result.grad_norm = _clip_and_step(model, optimizer, scheduler, accelerator, max_grad_norm)
    return result
