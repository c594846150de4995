"""The MetaLM trainer: semi-causal LM training on Hugging Face accelerate.

The same code runs on CPU, one GPU, or several processes under ``accelerate launch`` / ``torchrun``: DDP
(accelerate wraps the model), FSDP2 (``run.fsdp: true`` or an accelerate config with
``distributed_type: FSDP``, ``fsdp_version: 2``: the trainer calls ``torch.distributed.fsdp.fully_shard``
itself, each encoder as a unit, the decoder block by block, then the root), or DeepSpeed through an
accelerate config. The model code knows nothing of parallelism.

Exactness across numbers of processes: the data pipeline (:mod:`metalm.training.data`) yields one global
sample sequence, rank ``r`` training on its slice of each global micro-batch; each micro-batch's loss is
normalised by the number of target tokens of the *global* micro-batch (an all-reduced count passed as
``num_items_in_batch``) and multiplied by the number of processes, so DDP's (and FSDP's) gradient averaging
gives the gradient of the global mean. 2 processes × batch B then train like 1 process × batch 2B.

Output folder (``run.output_dir``)::

    config.yaml                 the resolved config
    train.log                   the run log (skipped records, data statistics, checkpoints, resume)
    metrics.jsonl, metrics.csv  one row per logged step: step, loss, lr, tokens_per_s, grad_norm, val_loss…
    tensorboard/                when tensorboard is installed
    checkpoint-N/               model/ (safetensors + processor), optimizer.pt (full, by parameter name),
                                scheduler.pt, data.json (global), rng_rank*.pt, trainer_state.json,
                                manifest.json
    loss_curve.png              train and validation loss against step
    final/                      the final model + processor (``AutoModelForCausalLM.from_pretrained``)

Checkpoints are written atomically: into ``checkpoint-N.tmp/``, every file fsynced, a ``manifest.json``
with the sha256 of every file, then renamed to ``checkpoint-N/`` and the parent folder fsynced (``final/``
gets a manifest too, verified when it is loaded). Resume takes the newest checkpoint whose manifest
verifies, moving newer corrupt or partial ones aside (``checkpoint-N.corrupt``) with a warning; when
checkpoints exist and none verifies it stops with an error naming each problem, unless
``run.resume=restart`` asks to start over.
Model and optimizer state are saved unsharded (gathered on the main process), keyed by parameter name, so
a checkpoint resumes on any number of processes, with or without FSDP. Nothing is unpickled on load:
safetensors for the model, ``torch.load(weights_only=True)`` for the rest.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import logging
import math
import os
import random
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from metalm.model.loading import MANIFEST, fsync_dir, verify_manifest, write_manifest
from metalm.training.config import ConfigError, TrainConfig, config_to_dict, layouts_from_streams, load_config

__all__ = [
    "CHECKPOINT_PATTERN",
    "METRIC_COLUMNS",
    "TrainResult",
    "Trainer",
    "add_train_parser",
    "find_checkpoint",
    "shard_model",
    "train",
    "train_main",
    "verify_checkpoint",
]

logger = logging.getLogger("metalm.training")

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
# Test hook: seconds to sleep inside a checkpoint write (after the files, before the manifest), so that a
# crash test can kill the process there deterministically.
SLOW_CHECKPOINT_ENV = "METALM_TEST_SLOW_CHECKPOINT"
METRIC_COLUMNS = ["step", "loss", "lr", "tokens_per_s", "grad_norm", "val_loss", "tokens", "elapsed_s"]


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


# --------------------------------------------------------------------------------------------
# Files: fsync, sha256, manifests


def _write_manifest(folder: Path, step: int, world_size: int = 1) -> None:
    write_manifest(folder, step=step, world_size=world_size)


def verify_checkpoint(folder: str | Path, world_size: int | None = None) -> str | None:
    """None when `folder` is a complete checkpoint whose files match its manifest, else the reason.

    The checkpoint's own manifest says how many processes wrote it (one RNG file each); any number of
    processes can resume it, so `world_size` is accepted for compatibility and not used. The model's
    weights are always required (see :func:`metalm.model.loading.verify_manifest`)."""
    del world_size
    folder = Path(folder)
    try:
        saved_world = int(json.loads((folder / MANIFEST).read_text(encoding="utf-8")).get("world_size", 1))
    except (OSError, ValueError, TypeError, AttributeError):
        saved_world = 1  # verify_manifest names what is wrong with the manifest
    required = ["trainer_state.json", "optimizer.pt", "scheduler.pt", "data.json", "model/config.json"]
    required += [f"rng_rank{r}.pt" for r in range(saved_world)]
    return verify_manifest(folder, required, model_dir="model")


def _checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    if not output_dir.is_dir():
        return []
    found = []
    for p in output_dir.iterdir():
        m = CHECKPOINT_PATTERN.match(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return sorted(found)


def _scan_checkpoints(output_dir: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest checkpoint that verifies (or None), and the newer ones that do not, with reasons."""
    rejected = []
    for _, path in reversed(_checkpoints(output_dir)):
        reason = verify_checkpoint(path)
        if reason is None:
            return path, rejected
        rejected.append((path, reason))
    return None, rejected


def _warn_interrupted(output_dir: Path) -> None:
    if output_dir.is_dir():
        for p in sorted(output_dir.glob("checkpoint-*.tmp")):
            logger.warning("ignoring incomplete checkpoint %s (an interrupted save)", p)


def find_checkpoint(output_dir: str | Path, world_size: int | None = None) -> Path | None:
    """The newest checkpoint in `output_dir` that verifies; corrupt or partial ones are skipped with a
    warning that names them. (`world_size`: unused, see :func:`verify_checkpoint`.)"""
    output_dir = Path(output_dir)
    _warn_interrupted(output_dir)
    found, rejected = _scan_checkpoints(output_dir)
    for path, reason in rejected:
        logger.warning("skipping checkpoint %s: %s", path, reason)
    return found


def _set_aside(path: Path, suffix: str) -> None:
    aside = path.with_name(f"{path.name}.{suffix}")
    if aside.exists():
        shutil.rmtree(aside)
    os.replace(path, aside)
    logger.warning("moved checkpoint %s to %s", path, aside.name)


def _resume_point(output_dir: Path, resume: bool | str) -> Path | None:
    """The checkpoint to resume from (None: step 0), per ``run.resume``; raises ConfigError rather than
    silently starting over when checkpoints exist but none can be used. Main process only."""
    _warn_interrupted(output_dir)
    existing = _checkpoints(output_dir)
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
    found, rejected = _scan_checkpoints(output_dir)
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


def _rng_state() -> dict[str, Any]:
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
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
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
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
# Metrics


class _Metrics:
    """metrics.jsonl + metrics.csv (+ TensorBoard) on the main process; `history` is every row."""

    def __init__(
        self, output_dir: Path, enabled: bool, tensorboard: bool, extra_columns: list[str] | None = None
    ) -> None:
        self.columns = METRIC_COLUMNS + list(extra_columns or [])
        self.jsonl = output_dir / "metrics.jsonl"
        self.csv = output_dir / "metrics.csv"
        self.enabled = enabled
        self.history: list[dict[str, Any]] = []
        self.tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                logger.info("tensorboard is not installed; metrics go to metrics.jsonl/csv only")
            else:
                self.tb = SummaryWriter(str(output_dir / "tensorboard"))

    def reset(self, history: list[dict[str, Any]]) -> None:
        """Rewrite the files from `history` (on resume: rows after the checkpoint are dropped)."""
        self.history = [dict(r) for r in history]
        if not self.enabled:
            return
        with open(self.jsonl, "w", encoding="utf-8") as fh:
            for row in self.history:
                fh.write(json.dumps(row) + "\n")
        with open(self.csv, "w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=self.columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(self.history)

    def write(self, row: dict[str, Any]) -> None:
        self.history.append(row)
        if not self.enabled:
            return
        with open(self.jsonl, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")
        with open(self.csv, "a", newline="", encoding="utf-8") as fh:
            csv.DictWriter(fh, fieldnames=self.columns, extrasaction="ignore").writerow(row)
        if self.tb is not None:
            step = row["step"]
            for key in ("loss", "lr", "tokens_per_s", "grad_norm"):
                if key in row:
                    self.tb.add_scalar(f"train/{key}", row[key], step)
            for key, value in row.items():
                if key.startswith("loss_"):
                    self.tb.add_scalar(f"train/{key}", value, step)
            for key, value in row.items():
                if key.startswith("val_loss"):
                    self.tb.add_scalar("val/" + (key[len("val_loss_") :] or "loss"), value, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def plot_loss_curve(history: list[dict[str, Any]], path: str | Path, title: str = "") -> None:
    """Train and validation loss against step as a PNG (matplotlib's Agg canvas: no display needed).
    With several streams, their own train (mix: batch) and validation losses are drawn too."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.8), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)

    def series(key: str) -> list[tuple[int, float]]:
        return [(r["step"], r[key]) for r in history if key in r]

    streams = sorted({k[len("val_loss_") :] for r in history for k in r if k.startswith("val_loss_")})
    streams += sorted({k[len("loss_") :] for r in history for k in r if k.startswith("loss_")} - set(streams))
    colors = dict(zip(streams, ("tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:olive")))
    train = series("loss")
    if train:
        ax.plot(
            *zip(*train), label="train loss", color="tab:blue", linewidth=1.0, alpha=0.5 if streams else 1.0
        )
    for name in streams:
        color = colors.get(name, "tab:gray")
        if series(f"loss_{name}"):
            ax.plot(*zip(*series(f"loss_{name}")), color=color, linewidth=1.0, label=f"train: {name}")
        if series(f"val_loss_{name}"):
            ax.plot(
                *zip(*series(f"val_loss_{name}")),
                color=color,
                linestyle="--",
                marker="o",
                markersize=3,
                label=f"validation: {name}",
            )
    if series("val_loss"):
        ax.plot(
            *zip(*series("val_loss")),
            label="validation loss (all)",
            color="tab:orange",
            marker="o",
            markersize=4,
            linewidth=2,
        )
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title or "MetaLM training")
    ax.grid(alpha=0.3)
    if train or streams:
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(str(path))


# --------------------------------------------------------------------------------------------
# The trainer


def _has_accelerator_device() -> bool:
    if torch.cuda.is_available():
        return True
    xpu = getattr(torch, "xpu", None)
    if xpu is not None and xpu.is_available():
        return True
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


@contextlib.contextmanager
def _quiet_hf_progress():
    """Hide transformers' "Writing model shards" bar while saving (it breaks the training bar)."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
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


def _is_fsdp(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def _test_pause(env: str) -> None:
    """Sleep for the seconds in environment variable `env` (crash tests aim their kills with it)."""
    seconds = float(os.environ.get(env, "0") or 0)
    if seconds > 0:
        logger.warning("%s: pausing %.1f s", env, seconds)
        time.sleep(seconds)


def describe_model(model) -> str:
    """One line on what a MetaLM is made of and what of it trains (for logs)."""

    def millions(params) -> str:
        return f"{sum(p.numel() for p in params) / 1e6:.1f}M"

    decoder = model.decoder
    encoders = ", ".join(
        f"{spec['name']} ({spec['kind']}, {spec['backbone']}, {millions(model.encoders[spec['name']].parameters())})"
        for spec in model.config.encoders
    )
    trainable = [p for p in model.parameters() if p.requires_grad]
    frozen = "trainable" if any(p.requires_grad for p in decoder.parameters()) else "frozen"
    return (
        f"decoder {decoder.config.model_type} ({millions(decoder.parameters())}, {frozen}); "
        f"encoders: {encoders or 'none'}; trainable {millions(trainable)} of {millions(model.parameters())}"
    )


class Trainer:
    """Train a MetaLM from a :class:`TrainConfig`; ``Trainer(config).train()`` returns a :class:`TrainResult`."""

    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        self.output_dir = Path(config.run.output_dir)
        self.fsdp = False  # set in train(): run.fsdp or an accelerate FSDP config
        self.deepspeed = False
        self._lora = None  # the peft tuner while LoRA adapters are unmerged (model.lora)

    # --- building -------------------------------------------------------------------------------------
    def _build_model(self, resume: Path | None = None):
        """A new model from the recipe or `init_from`; on resume, the checkpoint's model (its saved
        config already holds any `init_from` overrides)."""
        from metalm.data.processor import MetaLMProcessor
        from metalm.model.modeling_metalm import MetaLMForCausalLM

        cfg = self.config
        attn = cfg.model.attn_implementation
        if resume is not None and cfg.model.lora is not None:
            # A LoRA run's checkpoints keep the adapters unmerged (see metalm.training.lora).
            from metalm.training.lora import load_lora_checkpoint

            model, self._lora = load_lora_checkpoint(resume / "model", cfg.model.lora, attn)
            return model, MetaLMProcessor.from_pretrained(resume / "model", config=model.config)
        if resume is not None:
            model = MetaLMForCausalLM.from_pretrained(resume / "model", attn_implementation=attn)
            model.apply_freezing()
            return model, MetaLMProcessor.from_pretrained(resume / "model", config=model.config)
        if cfg.init_from is None:
            return cfg.model.to_recipe().build()
        if not (Path(cfg.init_from) / "config.json").is_file():
            raise ConfigError(
                f"{cfg.source or '<config>'}: init_from: {cfg.init_from!r} is not a saved MetaLM folder "
                "(no config.json); train the model it names first, or point init_from elsewhere"
            )
        model = MetaLMForCausalLM.from_pretrained(cfg.init_from, attn_implementation=attn)
        if cfg.model.semi_causal:
            model.config.semi_causal = {**model.config.semi_causal, **cfg.model.semi_causal}
        if cfg.model.decoder_trainable is not None:
            model.config.decoder_trainable = cfg.model.decoder_trainable
        model.apply_freezing()
        processor = MetaLMProcessor.from_pretrained(cfg.init_from, config=model.config)
        logger.info("init_from %s: %s", cfg.init_from, describe_model(model))
        return model, processor

    def _log_handler(self, main: bool) -> logging.Handler | None:
        if not main:
            return None
        handler = logging.FileHandler(self.output_dir / "train.log", encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handler.setLevel(logging.INFO)
        return handler

    # --- checkpoints ----------------------------------------------------------------------------------
    def _save_checkpoint(self, step: int, state: dict[str, Any]) -> Path:
        with _quiet_hf_progress():
            return self._write_checkpoint(step, state)

    def _unwrapped(self) -> torch.nn.Module:
        return self.model if self.fsdp else self.accelerator.unwrap_model(self.model)

    def _raw_optimizer(self) -> torch.optim.Optimizer:
        return getattr(self.optimizer, "optimizer", self.optimizer)  # under accelerate's wrapper

    def _model_state_dict(self) -> dict[str, torch.Tensor]:
        """The full (unsharded) model state on the main process; every process must call this."""
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            options = StateDictOptions(full_state_dict=True, cpu_offload=True)
            state = get_model_state_dict(self.model, options=options)
            # Gathering gives tied parameters (embeddings = LM head) one copy per name; share them
            # again so save_pretrained stores the tie once, as it does for an unsharded model.
            first: dict[int, str] = {}
            for name, param in self.model.named_parameters(remove_duplicate=False):
                if id(param) in first and name in state and first[id(param)] in state:
                    state[name] = state[first[id(param)]]
                first.setdefault(id(param), name)
            return state
        return self.accelerator.get_state_dict(self.model)  # DDP: a copy; DeepSpeed ZeRO-3 gathers

    def _optimizer_state_dict(self) -> dict[str, Any]:
        """The full optimizer state keyed by parameter name (not by position or shard), on the main
        process, so that any number of processes, sharded or not, can load it; every process calls this."""
        if self.deepspeed:
            return {}  # ZeRO partitions it in DeepSpeed's own format (see docs/training.md)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=torch.distributed.is_initialized())
        return get_optimizer_state_dict(self._unwrapped(), self._raw_optimizer(), options=options)

    def _load_optimizer_state(self, state: dict[str, Any]) -> None:
        if self.deepspeed or not state:
            logger.warning("the checkpoint has no optimizer state (DeepSpeed): AdamW's moments start afresh")
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        optimizer = self._raw_optimizer()
        # strict=False: a trainable parameter that never received a gradient (e.g. a vision encoder in a
        # text-only finetune) has no AdamW state to save, exactly as in the uninterrupted run.
        set_optimizer_state_dict(
            self._unwrapped(), optimizer, state, options=StateDictOptions(full_state_dict=True, strict=False)
        )
        # Loading may create zero gradients; a parameter must have none until it gets a real one
        # (AdamW skips parameters without a gradient, exactly as in an uninterrupted run).
        optimizer.zero_grad(set_to_none=True)

    def _write_checkpoint(self, step: int, state: dict[str, Any]) -> Path:
        acc = self.accelerator
        final = self.output_dir / f"checkpoint-{step}"
        tmp = self.output_dir / f"checkpoint-{step}.tmp"
        if acc.is_main_process:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        # Every rank takes part in gathering (FSDP, ZeRO-3); the main process receives the full state.
        model_state = self._model_state_dict()
        optimizer_state = self._optimizer_state_dict()
        rank = acc.process_index
        torch.save(_rng_state(), tmp / f"rng_rank{rank}.pt")
        if acc.is_main_process:
            self._unwrapped().save_pretrained(tmp / "model", state_dict=model_state)
            self.processor.save_pretrained(tmp / "model")
            torch.save(optimizer_state, tmp / "optimizer.pt")
            torch.save(self.scheduler.state_dict(), tmp / "scheduler.pt")
            # The data position is global (the same on every rank): one file.
            (tmp / "data.json").write_text(json.dumps(self.train_data.state_dict()), encoding="utf-8")
            (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1), encoding="utf-8")
            _test_pause(SLOW_CHECKPOINT_ENV)
        del model_state, optimizer_state
        acc.wait_for_everyone()
        if acc.is_main_process:
            _write_manifest(tmp, step, acc.num_processes)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            fsync_dir(self.output_dir)
            self._prune_checkpoints()
            logger.info("saved %s", final)
        acc.wait_for_everyone()
        return final

    def _prune_checkpoints(self) -> None:
        keep = self.config.run.keep_checkpoints
        found = _checkpoints(self.output_dir)
        for _, path in found[:-keep] if len(found) > keep else []:
            shutil.rmtree(path, ignore_errors=True)
            logger.info("removed old checkpoint %s", path)

    def _save_final(self, step: int) -> Path:
        acc = self.accelerator
        final = self.output_dir / "final"
        tmp = self.output_dir / "final.tmp"
        if self._lora is not None:
            # final/ is a plain MetaLM: fold the adapters into the decoder (every process: DDP replicas).
            from metalm.training.lora import merge_lora

            merge_lora(self._unwrapped(), self._lora)
            self._lora = None
        model_state = self._model_state_dict()
        with _quiet_hf_progress():
            self._write_final(model_state, tmp, final, step)
        acc.wait_for_everyone()
        return final

    def _write_final(self, model_state, tmp: Path, final: Path, step: int) -> None:
        acc = self.accelerator
        if acc.is_main_process:
            if tmp.exists():
                shutil.rmtree(tmp)
            self._unwrapped().save_pretrained(tmp, state_dict=model_state)
            self.processor.save_pretrained(tmp)
            # Loading verifies it (metalm.model.loading): a changed byte is refused, not served.
            write_manifest(tmp, step=step)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            fsync_dir(self.output_dir)

    # --- evaluation -----------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Token-weighted validation loss over the fixed validation batches (all processes together):
        ``{"val_loss": ..., "val_loss_<stream>": ...}``; empty without validation data."""
        if not self.val_batches:
            return {}
        from accelerate.utils import send_to_device

        acc = self.accelerator
        names = self.val_streams
        self.model.eval()
        # Row sums of token losses and token counts, per stream: [streams, 2].
        total = torch.zeros(len(names), 2, dtype=torch.float64, device=acc.device)
        for batch, rows in zip(self.val_batches, self.val_rows):
            batch = send_to_device(batch, acc.device)
            labels = batch.pop("labels")[:, 1:]
            with self._autocast():
                logits = self.model(**batch).logits[:, :-1].float()
            token_loss = torch.nn.functional.cross_entropy(
                logits.transpose(1, 2), labels, ignore_index=-100, reduction="none"
            )
            mask = labels != -100
            # A filler row (FSDP, see DataStream) has no labels; `rows` names the real ones.
            row_loss = (token_loss * mask).sum(1).double()[: len(rows)]
            row_n = mask.sum(1).double()[: len(rows)]
            index = torch.tensor([names.index(r) for r in rows], device=acc.device)
            total[:, 0].index_add_(0, index, row_loss)
            total[:, 1].index_add_(0, index, row_n)
        self.model.train()
        total = acc.reduce(total, reduction="sum")
        out = {}
        if total[:, 1].sum() > 0:
            out["val_loss"] = float(total[:, 0].sum() / total[:, 1].sum())
        if len(names) > 1:
            for name, (loss_sum, n) in zip(names, total.tolist()):
                if n > 0:
                    out[f"val_loss_{name}"] = loss_sum / n
        return out

    def _autocast(self):
        """bf16 autocast for a model accelerate did not wrap (FSDP); accelerate's DDP wrapper has its own."""
        if self.fsdp and self.config.run.mixed_precision == "bf16":
            return torch.autocast(device_type=self.accelerator.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # --- the loop -------------------------------------------------------------------------------------
    def train(self) -> TrainResult:
        from accelerate import Accelerator, DistributedDataParallelKwargs
        from accelerate.utils import DistributedType

        run, optim = self.config.run, self.config.optim
        acc = self.accelerator = Accelerator(
            # Without a GPU, say so: accelerate only sets up multi-process CPU training (gloo) under
            # torchrun when told it runs on CPU.
            cpu=not _has_accelerator_device(),
            gradient_accumulation_steps=optim.grad_accum,
            mixed_precision=run.mixed_precision,
            # A batch without images (or spans) leaves an encoder unused; DDP must not wait for its grads.
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
        )
        self.deepspeed = acc.distributed_type == DistributedType.DEEPSPEED
        # FSDP from the config, or from an accelerate config (accelerate launch --config_file ...). The
        # trainer shards the model itself (accelerate 1.15 has no FSDP on CPU, and MetaLM's units are
        # known here); accelerate still provides the process group, the device and accumulation.
        self.fsdp = run.fsdp or acc.distributed_type == DistributedType.FSDP
        if acc.distributed_type == DistributedType.FSDP and acc.state.fsdp_plugin.fsdp_version != 2:
            raise ConfigError(
                "FSDP version 1 is not supported: set fsdp_version: 2 in the accelerate config "
                "(metalm shards with torch.distributed.fsdp.fully_shard)"
            )
        if self.fsdp and self.deepspeed:
            raise ConfigError("run.fsdp cannot be combined with DeepSpeed; use one or the other")
        if self.deepspeed:
            _fill_deepspeed_config(acc, optim)
        main = acc.is_main_process
        if main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        acc.wait_for_everyone()
        handler = self._log_handler(main)
        package_logger = logging.getLogger("metalm")
        old_level = package_logger.level
        if handler is not None:
            package_logger.addHandler(handler)
        if not main:  # one voice: other processes only report problems
            package_logger.setLevel(logging.WARNING)
        elif package_logger.getEffectiveLevel() > logging.INFO:
            package_logger.setLevel(logging.INFO)
        try:
            return self._run()
        finally:
            if handler is not None:
                package_logger.removeHandler(handler)
                handler.close()
            package_logger.setLevel(old_level)

    def _run(self) -> TrainResult:
        from accelerate.utils import broadcast_object_list, send_to_device, set_seed
        from tqdm.auto import tqdm
        from transformers import get_linear_schedule_with_warmup

        from metalm.data.records import SkipReport
        from metalm.training.data import build_data

        acc = self.accelerator
        cfg, run, optim = self.config, self.config.run, self.config.optim
        main = acc.is_main_process
        world, rank = acc.num_processes, acc.process_index
        if main:
            (self.output_dir / "config.yaml").write_text(
                yaml.safe_dump(config_to_dict(cfg), sort_keys=False), encoding="utf-8"
            )
        logger.info(
            "training on %s, %d process(es)%s, mixed precision %s",
            acc.device,
            world,
            " (FSDP2)" if self.fsdp else " (DeepSpeed)" if self.deepspeed else "",
            run.mixed_precision,
        )

        # Which checkpoint to resume from: the main process decides, everyone follows (or fails with it).
        decision: list[str | None] = [None, None]  # [checkpoint path, error]
        if main:
            try:
                found = _resume_point(self.output_dir, run.resume)
                decision = [str(found) if found else None, None]
            except ConfigError as err:
                decision = [None, str(err)]
        if world > 1:
            decision = broadcast_object_list(decision)
        if decision[1] is not None:
            raise ConfigError(decision[1])
        resume = Path(decision[0]) if decision[0] else None

        set_seed(run.seed)
        model, self.processor = self._build_model(resume)
        # The saved model carries the layouts it is trained on, so generate/chat/serve use them.
        model.config.prompt_layouts = layouts_from_streams(
            cfg.data.streams, getattr(model.config, "prompt_layouts", None)
        )
        if cfg.model.lora is not None:
            if self.fsdp or self.deepspeed:
                raise ConfigError("model.lora runs on one process or with DDP, not with FSDP or DeepSpeed")
            if self._lora is None:  # a resumed LoRA model has its adapters already
                from metalm.training.lora import apply_lora

                self._lora = apply_lora(model, cfg.model.lora)
            n_lora = sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n)
            logger.info("LoRA on the decoder: %.2fM adapter parameters (merged into final/)", n_lora / 1e6)
        n_params = sum(p.numel() for p in model.parameters())
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        logger.info("model: %.1fM parameters, %.1fM trainable", n_params / 1e6, n_train / 1e6)

        report = SkipReport()
        self.train_data, val_data = build_data(
            cfg.data,
            self.processor,
            batch_size=optim.batch_size,
            seed=run.seed,
            rank=rank,
            world_size=world,
            report=report,
            # FSDP: every rank must run every encoder the global micro-batch uses (see DataStream).
            fill_encoders=self.fsdp,
        )
        self.val_batches, self.val_rows = [], []
        self.val_streams = list(val_data.names) if val_data is not None else []
        for _ in range(run.eval_batches if val_data is not None else 0):
            self.val_batches.append(val_data.next_batch())
            self.val_rows.append([name for name, _ in val_data.last_sources])
        if not self.val_batches:
            logger.info("no validation data: validation loss is not computed")

        if self.fsdp:
            if not torch.distributed.is_initialized():
                raise ConfigError(
                    "run.fsdp needs several processes: launch with torchrun or accelerate launch "
                    "(e.g. torchrun --nproc_per_node 2 -m metalm.cli train ...)"
                )
            self.model = shard_model(model, acc.device, world)
            self.optimizer = torch.optim.AdamW(
                _param_groups(self.model, optim.weight_decay), lr=optim.lr, betas=optim.betas, eps=optim.eps
            )
        else:
            optimizer = torch.optim.AdamW(
                _param_groups(model, optim.weight_decay), lr=optim.lr, betas=optim.betas, eps=optim.eps
            )
            # Together: DeepSpeed builds its engine from both.
            self.model, self.optimizer = acc.prepare(model, optimizer)
        # Stepped by hand once per optimizer step (not through accelerate, which would step it once
        # per process): `max_steps` counts optimizer steps.
        self.scheduler = get_linear_schedule_with_warmup(self.optimizer, optim.warmup_steps, optim.max_steps)
        trainable = [p for p in self.model.parameters() if p.requires_grad]

        per_stream = [f"val_loss_{n}" for n in self.val_streams] if len(self.val_streams) > 1 else []
        if len(self.train_data.names) > 1 and self.train_data.mix == "batch":
            per_stream = [f"loss_{n}" for n in self.train_data.names] + per_stream
        metrics = _Metrics(self.output_dir, main, run.tensorboard, per_stream)
        step, tokens_total, elapsed = 0, 0, 0.0
        if resume is not None:
            tstate = json.loads((resume / "trainer_state.json").read_text(encoding="utf-8"))
            step, tokens_total, elapsed = tstate["step"], tstate["tokens"], tstate["elapsed_s"]
            self._load_optimizer_state(torch.load(resume / "optimizer.pt", weights_only=True))
            self.scheduler.load_state_dict(torch.load(resume / "scheduler.pt", weights_only=True))
            data_state = json.loads((resume / "data.json").read_text(encoding="utf-8"))
            saved_batch = data_state["batch_size"] * data_state["world_size"]
            if saved_batch != optim.batch_size * world:
                logger.warning(
                    "the checkpoint was trained with %d samples per micro-batch (%d process(es) x "
                    "batch_size %d), this run uses %d (%d x %d): the sample sequence continues without "
                    "duplicates or gaps, but the batches differ from the original run's; keep "
                    "batch_size x processes the same to continue exactly",
                    saved_batch,
                    data_state["world_size"],
                    data_state["batch_size"],
                    optim.batch_size * world,
                    world,
                    optim.batch_size,
                )
            self.train_data.load_state_dict(data_state, strict=False)
            metrics.reset([r for r in tstate["history"] if r["step"] <= step])
            saved_world = tstate.get("world_size", 1)
            logger.info(
                "resumed from %s at step %d%s",
                resume,
                step,
                f" (saved by {saved_world} process(es), now {world})" if saved_world != world else "",
            )
        else:
            metrics.reset([])

        result = TrainResult(
            output_dir=self.output_dir,
            final_dir=self.output_dir / "final",
            metrics_path=self.output_dir / "metrics.jsonl",
            step=step,
            resumed_from=resume,
        )
        if step >= optim.max_steps:
            logger.info("step %d already reaches optim.max_steps=%d: nothing to train", step, optim.max_steps)
        # RNG last, so nothing between here and the first step draws from it (exact resume). A rank that
        # did not exist when the checkpoint was taken gets a seed of its own (only dropout draws on it).
        if resume is not None:
            rng_file = resume / f"rng_rank{rank}.pt"
            if rng_file.is_file():
                _set_rng_state(torch.load(rng_file, weights_only=True))
            else:
                set_seed(run.seed + 1000 * step + rank)

        self.model.train()
        bar = tqdm(
            total=optim.max_steps,
            initial=step,
            desc="train",
            unit="step",
            disable=not main,
            dynamic_ncols=True,
        )
        window = {"loss": 0.0, "grad_norm": 0.0, "steps": 0, "tokens": 0, "time": 0.0}
        # Train loss per stream (sum, micro-batches) when each micro-batch comes from one stream.
        train_streams = self.train_data.names if self.train_data.mix == "batch" else []
        stream_window = torch.zeros(len(train_streams), 2, dtype=torch.float64, device=acc.device)
        last_val_step = None
        start_step = step
        try:
            while step < optim.max_steps:
                t0 = time.perf_counter()
                loss_sum = torch.zeros((), device=acc.device)
                stream_step = torch.zeros_like(stream_window)
                tokens = 0
                grad_norm = None
                for _ in range(optim.grad_accum):
                    batch = self.train_data.next_batch()
                    rows = len(self.train_data.last_sources)  # a filler row (FSDP) comes after these
                    sources = {name for name, _ in self.train_data.last_sources}
                    tokens += int(batch["attention_mask"][:rows].sum())
                    # The loss is the mean over the target tokens of the *global* micro-batch: each rank
                    # sums its own and divides by the global count; times `world`, because DDP and FSDP
                    # average gradients over ranks. 2 x B processes then equal 1 x 2B.
                    targets = torch.tensor(float((batch["labels"][:, 1:] != -100).sum()), device=acc.device)
                    if world > 1:
                        targets = acc.reduce(targets, reduction="sum")
                    batch = send_to_device(batch, acc.device)
                    with acc.accumulate(self.model):
                        with self._autocast():
                            out = self.model(**batch, num_items_in_batch=targets.clamp(min=1))
                        loss = out.loss * world
                        acc.backward(loss)
                        loss_sum += loss.detach().float()
                        if train_streams and len(sources) == 1:
                            k = train_streams.index(sources.pop())
                            stream_step[k, 0] += loss.detach().double()
                            stream_step[k, 1] += 1
                        if acc.sync_gradients:
                            clip = optim.grad_clip if optim.grad_clip is not None else math.inf
                            if self.fsdp:
                                grad_norm = torch.nn.utils.clip_grad_norm_(trainable, clip)
                                grad_norm = getattr(grad_norm, "full_tensor", lambda g=grad_norm: g)()
                            else:
                                grad_norm = acc.clip_grad_norm_(trainable, clip)
                            self.optimizer.step()
                            self.scheduler.step()
                            self.optimizer.zero_grad(set_to_none=True)
                step += 1
                stats = torch.tensor(
                    [
                        float(loss_sum) / optim.grad_accum,
                        float(grad_norm) if grad_norm is not None else 0.0,
                        tokens,
                    ],
                    dtype=torch.float64,
                    device=acc.device,
                )
                if world > 1:
                    stats = acc.reduce(stats, reduction="sum")
                    stats[:2] /= world
                    stream_step = acc.reduce(stream_step, reduction="sum")
                stream_window += stream_step
                loss_value, gn, step_tokens = float(stats[0]), float(stats[1]), int(stats[2])
                dt = time.perf_counter() - t0
                elapsed += dt
                tokens_total += step_tokens
                result.losses[step] = loss_value
                for key, value in (
                    ("loss", loss_value),
                    ("grad_norm", gn),
                    ("tokens", step_tokens),
                    ("time", dt),
                ):
                    window[key] += value
                window["steps"] += 1
                if not math.isfinite(loss_value):
                    raise FloatingPointError(
                        f"step {step}: the loss is {loss_value}; lower optim.lr or check the data"
                    )

                row: dict[str, Any] = {}
                if (run.log_every and step % run.log_every == 0) or step == optim.max_steps:
                    n = window["steps"]
                    row.update(
                        loss=window["loss"] / n,
                        lr=self.scheduler.get_last_lr()[0],
                        tokens_per_s=window["tokens"] / max(window["time"], 1e-9),
                        grad_norm=window["grad_norm"] / n,
                        tokens=tokens_total,
                        elapsed_s=round(elapsed, 3),
                    )
                    if len(train_streams) > 1:
                        for name, (total, count) in zip(train_streams, stream_window.tolist()):
                            if count:
                                row[f"loss_{name}"] = total / count
                    bar.set_postfix(
                        loss=f"{row['loss']:.3f}", tok_s=f"{row['tokens_per_s']:.0f}", refresh=False
                    )
                    window = dict.fromkeys(window, 0)
                    stream_window.zero_()
                if (run.eval_every and step % run.eval_every == 0) or step == optim.max_steps:
                    val = self.evaluate()
                    last_val_step = step
                    if val:
                        row.update(val)
                        result.val_losses[step] = val["val_loss"]
                        result.last_val = val
                if row:
                    metrics.write({"step": step, **row})
                bar.update(1)
                if run.save_every and (step % run.save_every == 0 or step == optim.max_steps):
                    state = {
                        "step": step,
                        "tokens": tokens_total,
                        "elapsed_s": elapsed,
                        "world_size": world,
                        "history": metrics.history,
                        "data_stats": self.train_data.stats,
                        "config": config_to_dict(cfg),
                    }
                    result.checkpoints.append(self._save_checkpoint(step, state))
        finally:
            bar.close()

        if step == start_step and self.val_batches and last_val_step is None:
            # Nothing left to train (resumed at max_steps): still report the validation loss.
            val = self.evaluate()
            if val:
                result.val_losses[step] = val["val_loss"]
                result.last_val = val
        result.step = step
        result.tokens = tokens_total
        logged = [r["loss"] for r in metrics.history if "loss" in r]
        result.final_train_loss = logged[-1] if logged else None
        result.final_dir = self._save_final(step)
        if main:
            plot_loss_curve(
                metrics.history, self.output_dir / "loss_curve.png", title=f"MetaLM — {cfg.source or ''}"
            )
        metrics.close()
        self._log_summary(report, result)
        return result

    def _log_summary(self, report, result: TrainResult) -> None:
        data = self.train_data
        logger.info(
            "data: %d samples (%s); %d truncated to seq_len %d, %d skipped with nothing to train on",
            data.stats["samples"],
            ", ".join(f"{k} {v}" for k, v in data.per_stream.items()),
            data.stats["truncated"],
            data.seq_len,
            data.stats["skipped_no_target"],
        )
        if data.stats.get("inputs_truncated"):
            logger.info(
                "instruction inputs: %d cut to fit the text encoder / seq_len (classification text, word by word)",
                data.stats["inputs_truncated"],
            )
        if report.count:
            logger.warning("bad records: %s", _skip_summary(report, limit=50))
        else:
            logger.info("bad records: none")
        streams = ", ".join(
            f"{k[len('val_loss_') :]} {v:.4f}" for k, v in result.last_val.items() if k != "val_loss"
        )
        logger.info(
            "finished at step %d: train loss %s, validation loss %s%s; final model in %s",
            result.step,
            f"{result.last_loss:.4f}" if result.last_loss is not None else "-",
            f"{result.last_val_loss:.4f}" if result.last_val_loss is not None else "-",
            f" ({streams})" if streams else "",
            result.final_dir,
        )


def _fill_deepspeed_config(acc, optim) -> None:
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


def _skip_summary(report, limit: int = 50) -> str:
    """Like SkipReport.summary, for records located by file:line or by stream and index."""
    lines = [f"skipped {report.count} bad record{'s' if report.count != 1 else ''}:"]
    for path, line, fld, reason in report.items[:limit]:
        where = f"{path}:{line}" if line is not None else str(path)
        lines.append(f"  {where}: {f'field {fld!r}: ' if fld else ''}{reason}")
    if report.count > limit:
        lines.append(f"  ... and {report.count - min(limit, len(report.items))} more")
    return "\n".join(lines)


def train(config: TrainConfig) -> TrainResult:
    """Run training as configured (see ``docs/training.md``)."""
    return Trainer(config).train()


# --------------------------------------------------------------------------------------------
# Command line


class _TqdmHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        from tqdm.auto import tqdm

        try:
            tqdm.write(self.format(record))
        except Exception:  # logging must never crash training
            self.handleError(record)


def train_main(config_path: str, overrides: list[str], resume: bool | str | None = None) -> None:
    """`metalm train CONFIG [key=value ...]`: load the config, train, print where the results are."""
    try:
        config = load_config(config_path, overrides)
    except ConfigError as err:
        raise SystemExit(f"error: {err}") from None
    if resume is not None:
        config.run.resume = resume
    package_logger = logging.getLogger("metalm")
    if not package_logger.handlers:
        handler = _TqdmHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
        package_logger.addHandler(handler)
        package_logger.setLevel(logging.INFO)
    from metalm.data.records import RecordError
    from metalm.model.loading import ModelLoadError

    try:
        result = train(config)
    except (RecordError, ConfigError, ModelLoadError) as err:  # e.g. a broken init_from folder
        raise SystemExit(f"error: {err}") from None
    if int(os.environ.get("RANK", "0")) != 0:
        return
    print(f"final model: {result.final_dir}")
    print(f"metrics:     {result.metrics_path} (and metrics.csv, loss_curve.png)")
    if result.last_loss is not None:
        val = f", validation loss {result.last_val_loss:.4f}" if result.last_val_loss is not None else ""
        print(f"step {result.step}: train loss {result.last_loss:.4f}{val}")


def add_train_parser(subparsers) -> argparse.ArgumentParser:
    """Wire `metalm train CONFIG [key=value ...] [--resume/--no-resume | --restart]` into an argparse subparsers."""
    p = subparsers.add_parser(
        "train",
        help="train a MetaLM from a YAML config",
        description="Train a MetaLM (semi-causal LM). Overrides use key paths, e.g. optim.lr=1e-4 "
        "run.output_dir=runs/x data.seq_len=64 data.streams.0.weight=2. Run under `accelerate launch` "
        "or `torchrun` for several processes.",
    )
    p.add_argument("config", help="YAML config file, e.g. configs/quickstart.yaml")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    how = p.add_mutually_exclusive_group()
    how.add_argument(
        "--resume",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="continue from the newest valid checkpoint in run.output_dir (default: run.resume, true)",
    )
    how.add_argument(
        "--restart",
        dest="resume",
        action="store_const",
        const="restart",
        help="start from step 0 even if run.output_dir holds checkpoints (moved aside as checkpoint-N.old)",
    )
    p.set_defaults(func=lambda args: train_main(args.config, args.overrides, resume=args.resume))
    return p


def main(argv: list[str] | None = None) -> None:
    """`python -m metalm.training.trainer CONFIG [key=value ...]` (same as `metalm train`)."""
    parser = argparse.ArgumentParser(prog="python -m metalm.training.trainer")
    sub = parser.add_subparsers(dest="command", required=True)
    add_train_parser(sub)
    args = parser.parse_args(["train", *(argv if argv is not None else __import__("sys").argv[1:])])
    args.func(args)


if __name__ == "__main__":
    main()
