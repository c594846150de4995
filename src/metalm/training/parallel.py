"""Parallelism for the trainer: the accelerator, FSDP2 sharding and DeepSpeed's config.

The same code runs on CPU, one GPU, or several processes under ``accelerate launch`` / ``torchrun``: DDP
(accelerate wraps the model), FSDP2 (``run.fsdp: true`` or an accelerate config with
``distributed_type: FSDP``, ``fsdp_version: 2``: :func:`shard_model` calls
``torch.distributed.fsdp.fully_shard`` itself, each encoder as a unit, the decoder block by block, then the
root), or DeepSpeed through an accelerate config. The model code knows nothing of parallelism.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from metalm.training.config import ConfigError, OptimConfig, RunConfig

__all__ = [
    "Parallelism",
    "fill_deepspeed_config",
    "has_accelerator_device",
    "is_fsdp",
    "setup_parallelism",
    "shard_model",
    "unwrap_model",
]


@dataclass
class Parallelism:
    """The accelerator and the way the model is spread over its processes."""

    accelerator: Any
    fsdp: bool = False
    deepspeed: bool = False
    mixed_precision: str = "no"  # run.mixed_precision with `auto` resolved: "bf16" or "no"


def has_accelerator_device() -> bool:
    """Whether torch sees a GPU (CUDA, XPU or Apple's MPS)."""
    if torch.cuda.is_available():
        return True
    xpu = getattr(torch, "xpu", None)
    if xpu is not None and xpu.is_available():
        return True
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def setup_parallelism(run: RunConfig, optim: OptimConfig) -> Parallelism:
    """An accelerate ``Accelerator`` for this run, and whether it shards with FSDP2 or runs DeepSpeed."""
    from accelerate import Accelerator, DistributedDataParallelKwargs
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    from metalm.training.precision import resolve_mixed_precision

    mixed_precision = resolve_mixed_precision(run.mixed_precision)
    # accelerate keeps one AcceleratorState per process and refuses a second Accelerator with another
    # precision; a process that trains several runs (a stage and the next, scripts/interface_results.py)
    # starts each from a fresh one. The process group lives in PartialState, which is kept.
    AcceleratorState._reset_state(reset_partial_state=False)
    acc = Accelerator(
        # Without a GPU, say so: accelerate only sets up multi-process CPU training (gloo) under torchrun
        # when told it runs on CPU.
        cpu=not has_accelerator_device(),
        gradient_accumulation_steps=optim.grad_accum,
        mixed_precision=mixed_precision,
        # A batch without images (or spans) leaves an encoder unused; DDP must not wait for its grads.
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )
    deepspeed = acc.distributed_type == DistributedType.DEEPSPEED
    # FSDP from the config, or from an accelerate config (accelerate launch --config_file ...). The trainer
    # shards the model itself (accelerate 1.15 has no FSDP on CPU, and MetaLM's units are known here);
    # accelerate still provides the process group, the device and accumulation.
    fsdp = run.fsdp or acc.distributed_type == DistributedType.FSDP
    if acc.distributed_type == DistributedType.FSDP and acc.state.fsdp_plugin.fsdp_version != 2:
        raise ConfigError(
            "FSDP version 1 is not supported: set fsdp_version: 2 in the accelerate config "
            "(metalm shards with torch.distributed.fsdp.fully_shard)"
        )
    if fsdp and deepspeed:
        raise ConfigError("run.fsdp cannot be combined with DeepSpeed; use one or the other")
    if deepspeed:
        fill_deepspeed_config(acc, optim)
    return Parallelism(acc, fsdp=fsdp, deepspeed=deepspeed, mixed_precision=mixed_precision)


def fill_deepspeed_config(acc: Any, optim: OptimConfig) -> None:
    """Fill the DeepSpeed config's "auto" values that accelerate derives from a DataLoader (metalm has
    none) from the training config: micro-batch size, accumulation, clipping."""
    ds = acc.state.deepspeed_plugin.deepspeed_config
    values = {
        "train_micro_batch_size_per_gpu": optim.batch_size,
        "gradient_accumulation_steps": optim.grad_accum,
        "gradient_clipping": optim.grad_clip if optim.grad_clip is not None else 0.0,
    }
    for key, value in values.items():
        if ds.get(key, "auto") == "auto":
            ds[key] = value
    if ds.get("train_batch_size", "auto") == "auto":
        ds["train_batch_size"] = optim.batch_size * optim.grad_accum * acc.num_processes


def shard_model(model: torch.nn.Module, device: torch.device | str, world_size: int) -> torch.nn.Module:
    """Shard a MetaLM with FSDP2 (``torch.distributed.fsdp.fully_shard``), in place: each transformer block
    of the decoder (the classes the decoder lists in ``_no_split_modules``), each docked encoder as one
    unit, then the root (embeddings, final norm, LM head, connectors). Frozen and trainable parameters
    may share a unit (FSDP2 keeps the original parameters). Needs an initialised process group."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    device = torch.device(device)
    mesh = init_device_mesh(device.type, (world_size,))
    model.to(device)
    block_names = set(getattr(model.decoder, "_no_split_modules", None) or ())
    # Children before parents: fully_shard groups the parameters that no inner unit has claimed.
    blocks = [m for m in reversed(list(model.decoder.modules())) if type(m).__name__ in block_names]
    if not blocks:
        raise ValueError(
            f"FSDP: cannot find the transformer blocks of {type(model.decoder).__name__} "
            f"(its _no_split_modules is {sorted(block_names)})"
        )
    for block in blocks:
        fully_shard(block, mesh=mesh)
    for encoder in model.encoders.values():
        fully_shard(encoder, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def is_fsdp(model: torch.nn.Module) -> bool:
    """Whether `model` was sharded by :func:`shard_model` (accelerate never wraps such a model)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def unwrap_model(model: torch.nn.Module, accelerator: Any) -> torch.nn.Module:
    """The MetaLM inside accelerate's DDP / DeepSpeed wrapper; an FSDP2 model is its own."""
    return model if is_fsdp(model) else accelerator.unwrap_model(model)
