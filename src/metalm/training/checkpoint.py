"""Checkpoint I/O for the trainer: atomic writes, manifests, verification, resume points and RNG state.

A checkpoint is written into ``checkpoint-N.tmp/``, every file fsynced, a ``manifest.json`` with the sha256
of every file added, then renamed to ``checkpoint-N/`` and the parent folder fsynced (``final/`` gets a
manifest too, verified when it is loaded). Resume takes the newest checkpoint whose manifest verifies,
moving newer corrupt or partial ones aside (``checkpoint-N.corrupt``) with a warning; when checkpoints exist
and none verifies it stops with an error naming each problem, unless ``run.resume=restart`` asks to start
over. Model and optimizer state are saved unsharded (gathered on the main process), keyed by parameter name,
so a checkpoint resumes on any number of processes, with or without FSDP. Nothing is unpickled on load:
safetensors for the model, ``torch.load(weights_only=True)`` for the rest.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from metalm.model.loading import CHECKPOINT_PATTERN, MANIFEST, fsync_dir, verify_manifest, write_manifest
from metalm.training.config import ConfigError
from metalm.training.parallel import is_fsdp, unwrap_model

__all__ = [
    "CHECKPOINT_PATTERN",
    "SLOW_CHECKPOINT_ENV",
    "CheckpointWriter",
    "capture_rng_state",
    "find_checkpoint",
    "load_optimizer_state",
    "resume_point",
    "restore_rng_state",
    "verify_checkpoint",
    "write_checkpoint_manifest",
]

logger = logging.getLogger("metalm.training")

# Test hook: seconds to sleep inside a checkpoint write (after the files, before the manifest), so that a
# crash test can kill the process there deterministically.
SLOW_CHECKPOINT_ENV = "METALM_TEST_SLOW_CHECKPOINT"
REQUIRED_FILES = ["trainer_state.json", "optimizer.pt", "scheduler.pt", "data.json", "model/config.json"]


# --------------------------------------------------------------------------------------------
# Finding and verifying checkpoints


def write_checkpoint_manifest(folder: Path, step: int, world_size: int = 1) -> None:
    """The manifest that makes `folder` a complete checkpoint written by `world_size` processes."""
    write_manifest(folder, step=step, world_size=world_size)


def verify_checkpoint(folder: str | Path) -> str | None:
    """None when `folder` is a complete checkpoint whose files match its manifest, else the reason.

    The checkpoint's own manifest says how many processes wrote it (one RNG file each); any number of
    processes can resume it. The model's weights are always required (see
    :func:`metalm.model.loading.verify_manifest`)."""
    folder = Path(folder)
    try:
        saved_world = int(json.loads((folder / MANIFEST).read_text(encoding="utf-8")).get("world_size", 1))
    except (OSError, ValueError, TypeError, AttributeError):
        saved_world = 1  # verify_manifest names what is wrong with the manifest
    required = REQUIRED_FILES + [f"rng_rank{r}.pt" for r in range(saved_world)]
    return verify_manifest(folder, required, model_dir="model")


def list_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every ``checkpoint-N`` folder, oldest first, verified or not."""
    if not output_dir.is_dir():
        return []
    found = []
    for p in output_dir.iterdir():
        m = CHECKPOINT_PATTERN.match(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return sorted(found)


def _newest_verified(output_dir: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest checkpoint that verifies (or None), and the newer ones that do not, with reasons."""
    rejected = []
    for _, path in reversed(list_checkpoints(output_dir)):
        reason = verify_checkpoint(path)
        if reason is None:
            return path, rejected
        rejected.append((path, reason))
    return None, rejected


def _warn_interrupted(output_dir: Path) -> None:
    if output_dir.is_dir():
        for p in sorted(output_dir.glob("checkpoint-*.tmp")):
            logger.warning("ignoring incomplete checkpoint %s (an interrupted save)", p)


def find_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest checkpoint in `output_dir` that verifies; corrupt or partial ones are skipped with a
    warning that names them."""
    output_dir = Path(output_dir)
    _warn_interrupted(output_dir)
    found, rejected = _newest_verified(output_dir)
    for path, reason in rejected:
        logger.warning("skipping checkpoint %s: %s", path, reason)
    return found


def _set_aside(path: Path, suffix: str) -> None:
    aside = path.with_name(f"{path.name}.{suffix}")
    if aside.exists():
        shutil.rmtree(aside)
    os.replace(path, aside)
    logger.warning("moved checkpoint %s to %s", path, aside.name)


def resume_point(output_dir: Path, resume: bool | str) -> Path | None:
    """The checkpoint to resume from (None: step 0), per ``run.resume``; raises ConfigError rather than
    silently starting over when checkpoints exist but none can be used. Main process only."""
    _warn_interrupted(output_dir)
    existing = list_checkpoints(output_dir)
    if not existing:
        return None
    if resume == "restart":
        # Asked for: the earlier run's checkpoints go aside (not deleted) so they cannot mix with this one.
        for _, path in existing:
            _set_aside(path, "old")
        return None
    if not resume:
        raise ConfigError(
            f"{output_dir} already holds checkpoints ({existing[-1][1].name}); resume from them "
            "(--resume), start over with run.resume=restart (--restart), choose another run.output_dir, "
            "or delete them"
        )
    found, rejected = _newest_verified(output_dir)
    if found is None:
        reasons = "\n".join(f"  {path.name}: {reason}" for path, reason in rejected)
        raise ConfigError(
            f"cannot resume: no checkpoint in {output_dir} is usable (nothing was changed):\n{reasons}\n"
            "Start from step 0 with run.resume=restart (metalm train ... --restart; the checkpoints are "
            "moved aside as checkpoint-N.old), or restore a good checkpoint into the folder"
        )
    for path, reason in rejected:
        logger.warning("skipping checkpoint %s: %s", path, reason)
    # Checkpoints newer than the one resumed from failed verification: set them aside so that pruning
    # and later resumes only see this run's timeline.
    found_step = int(CHECKPOINT_PATTERN.match(found.name).group(1))
    for step_n, path in existing:
        if step_n > found_step:
            _set_aside(path, "corrupt")
    return found


# --------------------------------------------------------------------------------------------
# RNG state as tensors and plain numbers, so torch.load(weights_only=True) reads it back


def capture_rng_state() -> dict[str, Any]:
    """Python's, NumPy's, torch's and CUDA's RNG state in a form `torch.load(weights_only=True)` reads."""
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    return {
        "python_version": py_version,
        "python_state": torch.tensor(py_state, dtype=torch.int64),
        "python_gauss": py_gauss,
        "numpy_name": np_name,
        "numpy_keys": torch.from_numpy(np_keys.astype(np.int64)),
        "numpy_pos": int(np_pos),
        "numpy_has_gauss": int(np_has_gauss),
        "numpy_gauss": float(np_gauss),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    """Undo :func:`capture_rng_state`; CUDA's state only where the same number of GPUs is visible."""
    random.setstate(
        (
            state["python_version"],
            tuple(int(x) for x in state["python_state"].tolist()),
            state["python_gauss"],
        )
    )
    np.random.set_state(
        (
            state["numpy_name"],
            state["numpy_keys"].numpy().astype(np.uint32),
            state["numpy_pos"],
            state["numpy_has_gauss"],
            state["numpy_gauss"],
        )
    )
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------------------------
# Full (unsharded) state, gathered by every process for the main one


def full_model_state_dict(model: torch.nn.Module, accelerator: Any) -> dict[str, torch.Tensor]:
    """The full model state on the main process; every process must call this."""
    if not is_fsdp(model):
        return accelerator.get_state_dict(model)  # DDP: a copy; DeepSpeed ZeRO-3 gathers
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(model, options=options)
    # Gathering gives tied parameters (embeddings = LM head) one copy per name; share them again so
    # save_pretrained stores the tie once, as it does for an unsharded model.
    first: dict[int, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first and name in state and first[id(param)] in state:
            state[name] = state[first[id(param)]]
        first.setdefault(id(param), name)
    return state


def _raw_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    return getattr(optimizer, "optimizer", optimizer)  # under accelerate's wrapper


def full_optimizer_state_dict(model: torch.nn.Module, optimizer: Any, deepspeed: bool) -> dict[str, Any]:
    """The full optimizer state keyed by parameter name (not by position or shard), on the main process,
    so that any number of processes, sharded or not, can load it; every process calls this. `model` is
    the unwrapped model."""
    if deepspeed:
        return {}  # ZeRO partitions it in DeepSpeed's own format (see docs/training.md)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=torch.distributed.is_initialized())
    return get_optimizer_state_dict(model, _raw_optimizer(optimizer), options=options)


def load_optimizer_state(
    model: torch.nn.Module, optimizer: Any, state: dict[str, Any], deepspeed: bool
) -> None:
    """Load what :func:`full_optimizer_state_dict` saved into `optimizer` (`model`: the unwrapped model)."""
    if deepspeed or not state:
        logger.warning("the checkpoint has no optimizer state (DeepSpeed): AdamW's moments start afresh")
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    optimizer = _raw_optimizer(optimizer)
    # strict=False: a trainable parameter that never received a gradient (e.g. a vision encoder in a
    # text-only finetune) has no AdamW state to save, exactly as in the uninterrupted run.
    set_optimizer_state_dict(
        model, optimizer, state, options=StateDictOptions(full_state_dict=True, strict=False)
    )
    # Loading may create zero gradients; a parameter must have none until it gets a real one (AdamW
    # skips parameters without a gradient, exactly as in an uninterrupted run).
    optimizer.zero_grad(set_to_none=True)


# --------------------------------------------------------------------------------------------
# Writing


@contextlib.contextmanager
def _quiet_hf_progress() -> Iterator[None]:
    """Hide transformers' "Writing model shards" bar while saving (it breaks the training bar)."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def _test_pause(env: str) -> None:
    """Sleep for the seconds in environment variable `env` (crash tests aim their kills with it)."""
    seconds = float(os.environ.get(env, "0") or 0)
    if seconds > 0:
        logger.warning("%s: pausing %.1f s", env, seconds)
        time.sleep(seconds)


def _replace_dir(tmp: Path, final: Path) -> None:
    """Put the finished `tmp` in place of `final` and make the rename durable."""
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(final.parent)


class CheckpointWriter:
    """Writes ``checkpoint-N/`` and ``final/`` into `output_dir`, keeping the newest `keep` checkpoints.
    Every process calls :meth:`save` and :meth:`save_final` together (they gather sharded state)."""

    def __init__(self, accelerator: Any, output_dir: Path, keep: int, deepspeed: bool = False) -> None:
        self.accelerator = accelerator
        self.output_dir = output_dir
        self.keep = keep
        self.deepspeed = deepspeed

    def save(
        self,
        step: int,
        model: torch.nn.Module,
        optimizer: Any,
        scheduler: Any,
        processor: Any,
        data_state: dict[str, Any],
        trainer_state: dict[str, Any],
    ) -> Path:
        """Write ``checkpoint-<step>/`` atomically; `model`/`optimizer` as the trainer holds them (wrapped)."""
        acc = self.accelerator
        final = self.output_dir / f"checkpoint-{step}"
        tmp = self.output_dir / f"checkpoint-{step}.tmp"
        if acc.is_main_process:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        with _quiet_hf_progress():
            # Every rank takes part in gathering (FSDP, ZeRO-3); the main process receives the full state.
            model_state = full_model_state_dict(model, acc)
            optimizer_state = full_optimizer_state_dict(unwrap_model(model, acc), optimizer, self.deepspeed)
            torch.save(capture_rng_state(), tmp / f"rng_rank{acc.process_index}.pt")
            if acc.is_main_process:
                unwrap_model(model, acc).save_pretrained(tmp / "model", state_dict=model_state)
                processor.save_pretrained(tmp / "model")
                torch.save(optimizer_state, tmp / "optimizer.pt")
                torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
                # The data position is global (the same on every rank): one file.
                (tmp / "data.json").write_text(json.dumps(data_state), encoding="utf-8")
                (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=1), encoding="utf-8")
                _test_pause(SLOW_CHECKPOINT_ENV)
            del model_state, optimizer_state
            acc.wait_for_everyone()
            if acc.is_main_process:
                write_checkpoint_manifest(tmp, step, acc.num_processes)
                _replace_dir(tmp, final)
                self._prune()
                logger.info("saved %s", final)
        acc.wait_for_everyone()
        return final

    def _prune(self) -> None:
        found = list_checkpoints(self.output_dir)
        for _, path in found[: -self.keep] if len(found) > self.keep else []:
            shutil.rmtree(path, ignore_errors=True)
            logger.info("removed old checkpoint %s", path)

    def save_final(self, step: int, model: torch.nn.Module, processor: Any) -> Path:
        """Write ``final/``: the model and processor alone, with a manifest that loading verifies."""
        acc = self.accelerator
        final = self.output_dir / "final"
        tmp = self.output_dir / "final.tmp"
        model_state = full_model_state_dict(model, acc)
        with _quiet_hf_progress():
            if acc.is_main_process:
                if tmp.exists():
                    shutil.rmtree(tmp)
                unwrap_model(model, acc).save_pretrained(tmp, state_dict=model_state)
                processor.save_pretrained(tmp)
                # Loading verifies it (metalm.model.loading): a changed byte is refused, not served.
                write_manifest(tmp, step=step)
                _replace_dir(tmp, final)
        acc.wait_for_everyone()
        return final
