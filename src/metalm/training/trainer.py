"""The MetaLM trainer: semi-causal LM training on Hugging Face accelerate.

The loop (:meth:`Trainer._train_loop`) calls :func:`metalm.training.step.train_step` once per optimizer
step; the rest lives beside it: checkpoint I/O in :mod:`~metalm.training.checkpoint`, metrics and the loss
plot in :mod:`~metalm.training.metrics`, DDP / FSDP2 / DeepSpeed setup in :mod:`~metalm.training.parallel`,
the optimizer and schedule in :mod:`~metalm.training.optimizer`, the command line in
:mod:`~metalm.training.cli`.

Exactness across numbers of processes: the data pipeline (:mod:`metalm.training.data`) yields one global
sample sequence, rank ``r`` training on its slice of each global micro-batch, and ``train_step`` normalises
each loss by the global number of target tokens, so 2 processes × batch B train like 1 process × batch 2B.

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
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from metalm.training.checkpoint import (
    CHECKPOINT_PATTERN,
    SLOW_CHECKPOINT_ENV,
    CheckpointWriter,
    find_checkpoint,
    load_optimizer_state,
    restore_rng_state,
    resume_point,
    verify_checkpoint,
)
from metalm.training.config import ConfigError, TrainConfig, config_to_dict, layouts_from_streams
from metalm.training.init_from import load_init_from
from metalm.training.metrics import METRIC_COLUMNS, LogWindow, MetricsLog, plot_loss_curve
from metalm.training.optimizer import build_optimizer, build_scheduler
from metalm.training.parallel import setup_parallelism, shard_model, unwrap_model
from metalm.training.step import MicroBatch, StepResult, autocast, train_step

__all__ = [
    "CHECKPOINT_PATTERN",
    "METRIC_COLUMNS",
    "SLOW_CHECKPOINT_ENV",
    "TrainResult",
    "Trainer",
    "describe_model",
    "find_checkpoint",
    "plot_loss_curve",
    "shard_model",
    "train",
    "train_step",
    "verify_checkpoint",
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
class _Progress:
    """Where the run is; saved in each checkpoint's trainer_state.json."""

    step: int = 0
    tokens: int = 0
    elapsed: float = 0.0


def describe_model(model: Any) -> str:
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


def _skip_summary(report: Any, limit: int = 50) -> str:
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


class Trainer:
    """Train a MetaLM from a :class:`TrainConfig`; ``Trainer(config).train()`` returns a :class:`TrainResult`."""

    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        self.output_dir = Path(config.run.output_dir)
        self.fsdp = False  # set in train(): run.fsdp or an accelerate FSDP config
        self.deepspeed = False
        self.autocast_dtype: torch.dtype | None = None
        self.mixed_precision = "no"  # run.mixed_precision, `auto` resolved (set in train())
        self._lora = None  # the peft tuner while LoRA adapters are unmerged (model.lora)
        self.feature_cache = None  # run.feature_cache (see _attach_feature_cache)

    def train(self) -> TrainResult:
        """Set up the processes, train to ``optim.max_steps`` (resuming if asked), save ``final/``."""
        parallel = setup_parallelism(self.config.run, self.config.optim)
        self.accelerator, self.fsdp, self.deepspeed = parallel.accelerator, parallel.fsdp, parallel.deepspeed
        # bf16 autocast for a model accelerate did not wrap (FSDP); accelerate's DDP wrapper has its own.
        self.mixed_precision = parallel.mixed_precision  # `auto` resolved
        if self.fsdp and self.mixed_precision == "bf16":
            self.autocast_dtype = torch.bfloat16
        main = self.accelerator.is_main_process
        if main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        self.accelerator.wait_for_everyone()
        with self._run_logging(main):
            return self._run()

    @contextlib.contextmanager
    def _run_logging(self, main: bool) -> Iterator[None]:
        """train.log on the main process; the other processes only report problems (one voice)."""
        handler = None
        if main:
            handler = logging.FileHandler(self.output_dir / "train.log", encoding="utf-8")
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
            handler.setLevel(logging.INFO)
        package_logger = logging.getLogger("metalm")
        old_level = package_logger.level
        if handler is not None:
            package_logger.addHandler(handler)
        if not main:
            package_logger.setLevel(logging.WARNING)
        elif package_logger.getEffectiveLevel() > logging.INFO:
            package_logger.setLevel(logging.INFO)
        try:
            yield
        finally:
            if handler is not None:
                package_logger.removeHandler(handler)
                handler.close()
            package_logger.setLevel(old_level)

    def _run(self) -> TrainResult:
        from accelerate.utils import set_seed

        from metalm.data.records import SkipReport

        run, optim = self.config.run, self.config.optim
        self._log_start()
        resume = self._agree_on_resume_point()
        set_seed(run.seed)
        model = self._build_model_for_training(resume)
        self._check_packing(model)
        report = SkipReport()
        self._build_data(report)
        self._prepare_model_and_optimizer(model)
        self._attach_feature_cache()
        self.metrics = MetricsLog(
            self.output_dir, self.accelerator.is_main_process, run.tensorboard, self._per_stream_columns()
        )
        progress = self._restore(resume)
        result = TrainResult(
            output_dir=self.output_dir,
            final_dir=self.output_dir / "final",
            metrics_path=self.output_dir / "metrics.jsonl",
            step=progress.step,
            resumed_from=resume,
        )
        if progress.step >= optim.max_steps:
            logger.info(
                "step %d already reaches optim.max_steps=%d: nothing to train", progress.step, optim.max_steps
            )
        self._restore_rng(resume, progress.step)
        start_step = progress.step
        self._train_loop(progress, result)
        return self._finish(progress, result, trained=progress.step > start_step)

    # --- setting up -----------------------------------------------------------------------------------
    def _log_start(self) -> None:
        acc, run = self.accelerator, self.config.run
        if acc.is_main_process:
            (self.output_dir / "config.yaml").write_text(
                yaml.safe_dump(config_to_dict(self.config), sort_keys=False), encoding="utf-8"
            )
        logger.info(
            "training on %s, %d process(es)%s, mixed precision %s",
            acc.device,
            acc.num_processes,
            " (FSDP2)" if self.fsdp else " (DeepSpeed)" if self.deepspeed else "",
            self.mixed_precision
            if run.mixed_precision == self.mixed_precision
            else f"{self.mixed_precision} ({run.mixed_precision})",
        )

    def _agree_on_resume_point(self) -> Path | None:
        """The checkpoint to resume from: the main process decides, everyone follows (or fails with it)."""
        from accelerate.utils import broadcast_object_list

        acc = self.accelerator
        decision: list[str | None] = [None, None]  # [checkpoint path, error]
        if acc.is_main_process:
            try:
                found = resume_point(self.output_dir, self.config.run.resume)
                decision = [str(found) if found else None, None]
            except ConfigError as err:
                decision = [None, str(err)]
        if acc.num_processes > 1:
            decision = broadcast_object_list(decision)
        if decision[1] is not None:
            raise ConfigError(decision[1])
        return Path(decision[0]) if decision[0] else None

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
        return load_init_from(cfg)

    def _build_model_for_training(self, resume: Path | None) -> torch.nn.Module:
        """The model (and `self.processor`), with the run's prompt layouts and any LoRA adapters."""
        cfg = self.config
        model, self.processor = self._build_model(resume)
        # The saved model carries the layouts it is trained on, so generate/chat/serve use them.
        model.config.prompt_layouts = layouts_from_streams(
            cfg.data.streams, getattr(model.config, "prompt_layouts", None)
        )
        if cfg.model.lora is not None:
            self._add_lora(model)
        n_params = sum(p.numel() for p in model.parameters())
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        logger.info("model: %.1fM parameters, %.1fM trainable", n_params / 1e6, n_train / 1e6)
        return model

    def _check_packing(self, model: torch.nn.Module) -> None:
        """`data.pack` needs a decoder that keeps packed samples apart (measured, see `supports_packing`)
        and no filler rows (FSDP's are appended after the real rows, which packing would mix)."""
        if not self.config.data.pack:
            return
        where = f"{self.config.source or '<config>'}: data.pack"
        if self.fsdp:
            raise ConfigError(f"{where}: packing does not run with FSDP yet; use DDP or one process")
        if not model.supports_packing():
            decoder = model.config.text_config
            raise ConfigError(
                f"{where}: the decoder ({decoder.model_type}, attention {decoder._attn_implementation}) lets "
                "packed samples attend to each other; train it without packing"
            )

    def _add_lora(self, model: torch.nn.Module) -> None:
        if self.fsdp or self.deepspeed:
            raise ConfigError("model.lora runs on one process or with DDP, not with FSDP or DeepSpeed")
        if self._lora is None:  # a resumed LoRA model has its adapters already
            from metalm.training.lora import apply_lora

            self._lora = apply_lora(model, self.config.model.lora)
        n_lora = sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n)
        logger.info("LoRA on the decoder: %.2fM adapter parameters (merged into final/)", n_lora / 1e6)

    def _build_data(self, report: Any) -> None:
        """The train stream and the fixed validation batches (drawn once, before training)."""
        from metalm.training.data import build_data

        cfg, acc = self.config, self.accelerator
        self.train_data, val_data = build_data(
            cfg.data,
            self.processor,
            batch_size=cfg.optim.batch_size,
            seed=cfg.run.seed,
            rank=acc.process_index,
            world_size=acc.num_processes,
            report=report,
            # FSDP: every rank must run every encoder the global micro-batch uses (see DataStream).
            fill_encoders=self.fsdp,
        )
        self.val_batches, self.val_rows = [], []
        self.val_streams = list(val_data.names) if val_data is not None else []
        for _ in range(cfg.run.eval_batches if val_data is not None else 0):
            self.val_batches.append(val_data.next_batch())
            self.val_rows.append([name for name, _ in val_data.last_sources])
        if not self.val_batches:
            logger.info("no validation data: validation loss is not computed")

    def _prepare_model_and_optimizer(self, model: torch.nn.Module) -> None:
        acc, optim = self.accelerator, self.config.optim
        if self.fsdp:
            if not torch.distributed.is_initialized():
                raise ConfigError(
                    "run.fsdp needs several processes: launch with torchrun or accelerate launch "
                    "(e.g. torchrun --nproc_per_node 2 -m metalm.cli train ...)"
                )
            self.model = shard_model(model, acc.device, acc.num_processes)
            self.optimizer = build_optimizer(self.model, optim)
        else:
            # Together: DeepSpeed builds its engine from both.
            self.model, self.optimizer = acc.prepare(model, build_optimizer(model, optim))
        self.scheduler = build_scheduler(self.optimizer, optim)
        self.checkpoints = CheckpointWriter(
            acc, self.output_dir, self.config.run.keep_checkpoints, self.deepspeed
        )

    def _attach_feature_cache(self) -> None:
        """`run.feature_cache`: serve the encoders' frozen lower parts from a FeatureCache (one process, DDP)."""
        from metalm.model.feature_cache import CacheStats, FeatureCache, default_cache_dir

        self.feature_cache = None
        setting = self.config.run.feature_cache
        if setting is False:
            return
        if self.fsdp or self.deepspeed:
            # Sharded weights cannot be fingerprinted outside the forward pass: train without the cache.
            logger.warning("run.feature_cache is off: it does not run with FSDP or DeepSpeed yet")
            return
        directory = default_cache_dir() if setting is True else Path(setting).expanduser()
        cache = FeatureCache(directory, preprocessors=self.processor.preprocessors)
        names = cache.attach(self._unwrapped())
        if not names:
            logger.info(
                "run.feature_cache: no encoder has frozen lower layers (trainable_layers); nothing to cache"
            )
            return
        self.feature_cache, self.feature_cache_total = cache, CacheStats()
        logger.info("feature cache for encoder(s) %s in %s", ", ".join(names), directory)

    def _feature_cache_row(self) -> dict[str, float]:
        """The cache's hit rate over the lookups since the last logged row (training and validation)."""
        if self.feature_cache is None:
            return {}
        from metalm.model.feature_cache import CacheStats

        stats, self.feature_cache.stats = self.feature_cache.stats, CacheStats()
        for name, value in vars(stats).items():
            setattr(self.feature_cache_total, name, getattr(self.feature_cache_total, name) + value)
        if stats.corrupt:
            logger.warning("feature cache: %d unreadable entries recomputed", stats.corrupt)
        return {"feature_cache_hit_rate": round(stats.hit_rate, 4)} if stats.lookups else {}

    def _per_stream_columns(self) -> list[str]:
        """Metrics columns beyond METRIC_COLUMNS: per-stream validation and (``mix: batch``) train losses."""
        columns = [f"val_loss_{n}" for n in self.val_streams] if len(self.val_streams) > 1 else []
        if len(self.train_data.names) > 1 and self.train_data.mix == "batch":
            columns = [f"loss_{n}" for n in self.train_data.names] + columns
        if self.feature_cache is not None:
            columns.append("feature_cache_hit_rate")
        return columns

    def _restore(self, resume: Path | None) -> _Progress:
        """Optimizer, schedule, data position and metrics history from `resume` (None: a fresh start)."""
        if resume is None:
            self.metrics.reset([])
            return _Progress()
        state = json.loads((resume / "trainer_state.json").read_text(encoding="utf-8"))
        progress = _Progress(state["step"], state["tokens"], state["elapsed_s"])
        optimizer_state = torch.load(resume / "optimizer.pt", weights_only=True)
        load_optimizer_state(self._unwrapped(), self.optimizer, optimizer_state, self.deepspeed)
        self.scheduler.load_state_dict(torch.load(resume / "scheduler.pt", weights_only=True))
        data_state = json.loads((resume / "data.json").read_text(encoding="utf-8"))
        self._warn_if_batch_changed(data_state)
        self.train_data.load_state_dict(data_state, strict=False)
        self.metrics.reset([r for r in state["history"] if r["step"] <= progress.step])
        saved_world, world = state.get("world_size", 1), self.accelerator.num_processes
        logger.info(
            "resumed from %s at step %d%s",
            resume,
            progress.step,
            f" (saved by {saved_world} process(es), now {world})" if saved_world != world else "",
        )
        return progress

    def _warn_if_batch_changed(self, data_state: dict[str, Any]) -> None:
        world, batch_size = self.accelerator.num_processes, self.config.optim.batch_size
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

    def _restore_rng(self, resume: Path | None, step: int) -> None:
        """Last before the loop, so nothing draws from the RNGs between here and the first step (exact
        resume). A rank that did not exist when the checkpoint was taken gets a seed of its own (only
        dropout draws on it)."""
        from accelerate.utils import set_seed

        if resume is None:
            return
        rank = self.accelerator.process_index
        rng_file = resume / f"rng_rank{rank}.pt"
        if rng_file.is_file():
            restore_rng_state(torch.load(rng_file, weights_only=True))
        else:
            set_seed(self.config.run.seed + 1000 * step + rank)

    # --- the loop -------------------------------------------------------------------------------------
    def _train_loop(self, progress: _Progress, result: TrainResult) -> None:
        """One :func:`train_step` per optimizer step; metrics rows, validation and checkpoints when due."""
        from tqdm.auto import tqdm

        run, optim = self.config.run, self.config.optim
        max_grad_norm = optim.grad_clip if optim.grad_clip is not None else math.inf  # inf: measure only
        # Train loss per stream (sum, micro-batches) when each micro-batch comes from one stream.
        streams = self.train_data.names if self.train_data.mix == "batch" else []
        window = LogWindow(streams, self.accelerator.device)
        self.model.train()
        bar = tqdm(
            total=optim.max_steps,
            initial=progress.step,
            desc="train",
            unit="step",
            disable=not self.accelerator.is_main_process,
            dynamic_ncols=True,
        )
        from metalm.training.loader import BatchLoader

        # Started here, after a resume moved the data to where training continues.
        self.batches = BatchLoader(self.train_data, self.config.data.num_workers)
        try:
            while progress.step < optim.max_steps:
                started = time.perf_counter()
                sources: list[set[str]] = []
                measured = train_step(
                    self.model,
                    self._micro_batches(sources),
                    self.optimizer,
                    self.accelerator,
                    scheduler=self.scheduler,
                    max_grad_norm=max_grad_norm,
                    autocast_dtype=self.autocast_dtype,
                )
                progress.step += 1
                loss, grad_norm, tokens, stream_sums = self._reduce_step(measured, sources, streams)
                seconds = time.perf_counter() - started
                progress.elapsed += seconds
                progress.tokens += tokens
                result.losses[progress.step] = loss
                window.add(loss, grad_norm, tokens, seconds, stream_sums)
                if not math.isfinite(loss):
                    raise FloatingPointError(
                        f"step {progress.step}: the loss is {loss}; lower optim.lr or check the data"
                    )
                row = self._due_row(progress, window, result, bar)
                if row:
                    self.metrics.write({"step": progress.step, **row})
                bar.update(1)
                if run.save_every and (
                    progress.step % run.save_every == 0 or progress.step == optim.max_steps
                ):
                    result.checkpoints.append(self._save_checkpoint(progress))
        finally:
            self.batches.close()
            bar.close()

    def _micro_batches(self, sources: list[set[str]]) -> Iterator[MicroBatch]:
        """This step's micro-batches, read as train_step asks; `sources` gets each one's stream names."""
        for _ in range(self.config.optim.grad_accum):
            batch = self.batches.next()
            sources.append({name for name, _ in batch.sources})
            # A filler row (FSDP) comes after the real ones; packed rows (never with FSDP) are all real.
            rows = None if self.config.data.pack else len(batch.sources)
            yield MicroBatch(batch.inputs, rows=rows)

    def _reduce_step(
        self, measured: StepResult, sources: list[set[str]], streams: list[str]
    ) -> tuple[float, float, int, torch.Tensor]:
        """Mean loss, grad norm and token count over all processes, and the per-stream loss sums."""
        acc = self.accelerator
        stream_sums = torch.zeros(len(streams), 2, dtype=torch.float64, device=acc.device)
        for loss, names in zip(measured.micro_losses, sources):
            if streams and len(names) == 1:
                k = streams.index(next(iter(names)))
                stream_sums[k, 0] += loss.double()
                stream_sums[k, 1] += 1
        grad_norm = float(measured.grad_norm) if measured.grad_norm is not None else 0.0
        stats = torch.tensor(
            [float(measured.loss_sum) / self.config.optim.grad_accum, grad_norm, measured.tokens],
            dtype=torch.float64,
            device=acc.device,
        )
        if acc.num_processes > 1:
            stats = acc.reduce(stats, reduction="sum")
            stats[:2] /= acc.num_processes
            stream_sums = acc.reduce(stream_sums, reduction="sum")
        return float(stats[0]), float(stats[1]), int(stats[2]), stream_sums

    def _due_row(
        self, progress: _Progress, window: LogWindow, result: TrainResult, bar: Any
    ) -> dict[str, Any]:
        """The metrics row of this step: train means every ``run.log_every`` steps, validation every
        ``run.eval_every`` steps, both at the last step; empty when neither is due."""
        run, step = self.config.run, progress.step
        last = step == self.config.optim.max_steps
        row: dict[str, Any] = {}
        if (run.log_every and step % run.log_every == 0) or last:
            row = window.take_row(self.scheduler.get_last_lr()[0], progress.tokens, progress.elapsed)
            row.update(self._feature_cache_row())
            bar.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{row['tokens_per_s']:.0f}", refresh=False)
        if (run.eval_every and step % run.eval_every == 0) or last:
            row.update(self._validate(result, step))
        return row

    def _validate(self, result: TrainResult, step: int) -> dict[str, float]:
        val = self.evaluate()
        if val:
            result.val_losses[step] = val["val_loss"]
            result.last_val = val
        return val

    # --- checkpoints and the end ----------------------------------------------------------------------
    def _unwrapped(self) -> torch.nn.Module:
        return unwrap_model(self.model, self.accelerator)

    def _data_state(self) -> dict[str, Any]:
        """The training data's state, with what every process found while building its rows (each
        builds only its own: truncations and bad records differ per process)."""
        peers = None
        if self.accelerator.num_processes > 1:
            from accelerate.utils import gather_object

            tallies = gather_object([self.train_data.local_tally()])
            peers = [t for i, t in enumerate(tallies) if i != self.accelerator.process_index]
        return self.train_data.state_dict(peers)

    def _save_checkpoint(self, progress: _Progress) -> Path:
        data_state = self._data_state()
        trainer_state = {
            "step": progress.step,
            "tokens": progress.tokens,
            "elapsed_s": progress.elapsed,
            "world_size": self.accelerator.num_processes,
            "history": self.metrics.history,
            "data_stats": data_state["stats"],
            "config": config_to_dict(self.config),
        }
        return self.checkpoints.save(
            progress.step,
            self.model,
            self.optimizer,
            self.scheduler,
            self.processor,
            data_state,
            trainer_state,
        )

    def _save_final(self, step: int) -> Path:
        if self._lora is not None:
            # final/ is a plain MetaLM: fold the adapters into the decoder (every process: DDP replicas).
            from metalm.training.lora import merge_lora

            merge_lora(self._unwrapped(), self._lora)
            self._lora = None
        return self.checkpoints.save_final(step, self.model, self.processor)

    def _finish(self, progress: _Progress, result: TrainResult, trained: bool) -> TrainResult:
        if not trained and self.val_batches:
            # Nothing left to train (resumed at max_steps): still report the validation loss.
            self._validate(result, progress.step)
        result.step = progress.step
        result.tokens = progress.tokens
        logged = [r["loss"] for r in self.metrics.history if "loss" in r]
        result.final_train_loss = logged[-1] if logged else None
        result.final_dir = self._save_final(progress.step)
        if self.accelerator.is_main_process:
            plot_loss_curve(
                self.metrics.history,
                self.output_dir / "loss_curve.png",
                title=f"MetaLM — {self.config.source or ''}",
            )
        self.metrics.close()
        self._log_summary(result)
        return result

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
            with autocast(acc.device.type, self.autocast_dtype):
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

    def _log_summary(self, result: TrainResult) -> None:
        from metalm.data.records import SkipReport

        if self.feature_cache is not None:
            self._feature_cache_row()
            total = self.feature_cache_total
            logger.info(
                "feature cache: %d rows looked up, hit rate %.3f (%d from memory, %d from disk), %d "
                "unreadable entries recomputed",
                total.lookups,
                total.hit_rate,
                total.memory_hits,
                total.disk_hits,
                total.corrupt,
            )

        state = self._data_state()  # every process's finds
        stats = state["stats"]
        logger.info(
            "data: %d samples (%s); %d truncated to seq_len %d, %d skipped with nothing to train on",
            stats["samples"],
            ", ".join(f"{k} {v}" for k, v in state["per_stream"].items()),
            stats["truncated"],
            self.train_data.seq_len,
            stats["skipped_no_target"],
        )
        if stats.get("inputs_truncated"):
            logger.info(
                "instruction inputs: %d cut to fit the text encoder / seq_len (classification text, word by word)",
                stats["inputs_truncated"],
            )
        report = SkipReport(state["skip_report"]["count"], [tuple(i) for i in state["skip_report"]["items"]])
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


if __name__ == "__main__":  # `python -m metalm.training.trainer`: the command line, which imports this module
    from metalm.training.cli import main

    main()
