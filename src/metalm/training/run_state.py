"""Where a training run stands, and how it continues from a checkpoint.

:class:`Progress` is what ``trainer_state.json`` saves of the loop; :class:`TrainResult` is what a run hands
back. Resuming is three steps, in the trainer's order: every process agrees on the checkpoint
(:func:`agree_on_resume_point`), the optimizer, schedule, data position and metrics history come back
(:func:`restore_progress`), and last, right before the loop, the RNGs (:func:`restore_rng`). The files
themselves are written and checked by :mod:`metalm.training.checkpoint`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from metalm.training.checkpoint import load_optimizer_state, restore_rng_state, resume_point
from metalm.training.config import ConfigError, TrainConfig, config_to_dict

__all__ = [
    "Progress",
    "TrainResult",
    "agree_on_resume_point",
    "gather_data_state",
    "restore_progress",
    "restore_rng",
    "trainer_state",
]

logger = logging.getLogger("metalm.training")


@dataclass
class TrainResult:
    """What a run produced. ``losses``/``val_losses`` map step → loss for the steps this call ran
    (after a resume: only the steps after the checkpoint). ``last_val`` is the last evaluation, with
    per-stream losses (``val_loss_<stream>``) when there are several validation streams."""

    output_dir: Path
    final_dir: Path
    metrics_path: Path
    step: int
    losses: dict[int, float] = field(default_factory=dict)
    val_losses: dict[int, float] = field(default_factory=dict)
    last_val: dict[str, float] = field(default_factory=dict)
    final_train_loss: float | None = None
    tokens: int = 0
    resumed_from: Path | None = None
    checkpoints: list[Path] = field(default_factory=list)

    @property
    def last_loss(self) -> float | None:
        """The mean train loss of the last logged row (the last `run.log_every` steps; one step's loss
        swings with the stream it came from)."""
        if self.final_train_loss is not None:
            return self.final_train_loss
        return self.losses[max(self.losses)] if self.losses else None

    @property
    def last_val_loss(self) -> float | None:
        return self.val_losses[max(self.val_losses)] if self.val_losses else None


@dataclass
class Progress:
    """Where the run is; saved in each checkpoint's trainer_state.json."""

    step: int = 0
    tokens: int = 0
    elapsed: float = 0.0


def agree_on_resume_point(accelerator: Any, output_dir: Path, resume: bool | str) -> Path | None:
    """The checkpoint to resume from (``run.resume``): the main process decides, everyone follows (or
    fails with it)."""
    from accelerate.utils import broadcast_object_list

    decision: list[str | None] = [None, None]  # [checkpoint path, error]
    if accelerator.is_main_process:
        try:
            found = resume_point(output_dir, resume)
            decision = [str(found) if found else None, None]
        except ConfigError as err:
            decision = [None, str(err)]
    if accelerator.num_processes > 1:
        decision = broadcast_object_list(decision)
    if decision[1] is not None:
        raise ConfigError(decision[1])
    return Path(decision[0]) if decision[0] else None


def gather_data_state(train_data: Any, accelerator: Any) -> dict[str, Any]:
    """The training data's state, with what every process found while building its rows (each builds
    only its own: truncations and bad records differ per process). Collective: every process calls it."""
    peers = None
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        tallies = gather_object([train_data.local_tally()])
        peers = [t for i, t in enumerate(tallies) if i != accelerator.process_index]
    return train_data.state_dict(peers)


def trainer_state(
    progress: Progress, world_size: int, history: list[dict[str, Any]], data_stats: Any, config: TrainConfig
) -> dict[str, Any]:
    """The contents of a checkpoint's trainer_state.json."""
    return {
        "step": progress.step,
        "tokens": progress.tokens,
        "elapsed_s": progress.elapsed,
        "world_size": world_size,
        "history": history,
        "data_stats": data_stats,
        "config": config_to_dict(config),
    }


def restore_progress(
    resume: Path,
    *,
    model: torch.nn.Module,
    optimizer: Any,
    scheduler: Any,
    train_data: Any,
    metrics: Any,
    accelerator: Any,
    batch_size: int,
    deepspeed: bool,
) -> Progress:
    """Optimizer (onto the unwrapped `model`), schedule, data position and metrics history from `resume`."""
    state = json.loads((resume / "trainer_state.json").read_text(encoding="utf-8"))
    progress = Progress(state["step"], state["tokens"], state["elapsed_s"])
    optimizer_state = torch.load(resume / "optimizer.pt", weights_only=True)
    load_optimizer_state(model, optimizer, optimizer_state, deepspeed)
    scheduler.load_state_dict(torch.load(resume / "scheduler.pt", weights_only=True))
    data_state = json.loads((resume / "data.json").read_text(encoding="utf-8"))
    _warn_if_batch_changed(data_state, accelerator.num_processes, batch_size, train_data.batch_sizes)
    train_data.load_state_dict(data_state, strict=False)
    metrics.reset([r for r in state["history"] if r["step"] <= progress.step])
    saved_world, world = state.get("world_size", 1), accelerator.num_processes
    logger.info(
        "resumed from %s at step %d%s",
        resume,
        progress.step,
        f" (saved by {saved_world} process(es), now {world})" if saved_world != world else "",
    )
    return progress


def _warn_if_batch_changed(
    data_state: dict[str, Any], world: int, batch_size: int, stream_sizes: dict[str, int]
) -> None:
    saved_streams = data_state.get("batch_sizes", {})
    if saved_streams != stream_sizes:
        logger.warning(
            "the checkpoint was trained with streams' own batch sizes %s, this run has %s: the sample "
            "sequence continues without duplicates or gaps, but the batches differ from the original run's",
            saved_streams,
            stream_sizes,
        )
    saved_batch = data_state["batch_size"] * data_state["world_size"]
    if saved_batch != batch_size * world:
        logger.warning(
            "the checkpoint was trained with %d samples per micro-batch (%d process(es) x "
            "batch_size %d), this run uses %d (%d x %d): the sample sequence continues without "
            "duplicates or gaps, but the batches differ from the original run's; keep "
            "batch_size x processes the same to continue exactly",
            saved_batch,
            data_state["world_size"],
            data_state["batch_size"],
            batch_size * world,
            world,
            batch_size,
        )


def restore_rng(resume: Path | None, rank: int, seed: int, step: int) -> None:
    """Call last before the loop, so nothing draws from the RNGs between here and the first step (exact
    resume). A rank that did not exist when the checkpoint was taken gets a seed of its own (only dropout
    draws on it)."""
    from accelerate.utils import set_seed

    if resume is None:
        return
    rng_file = resume / f"rng_rank{rank}.pt"
    if rng_file.is_file():
        restore_rng_state(torch.load(rng_file, weights_only=True))
    else:
        set_seed(seed + 1000 * step + rank)
