"""The MetaLM trainer: semi-causal LM training on Hugging Face accelerate.

A thin loop around a step (torchtitan's shape): :meth:`Trainer._train_loop` calls
:func:`metalm.training.step.train_step` once per optimizer step and writes a metrics row, validates and
checkpoints when due. Each other job has its module: the model to train in
:mod:`~metalm.training.model_setup`, validation in :mod:`~metalm.training.validation`, the run's position
and resume in :mod:`~metalm.training.run_state`, checkpoint I/O in :mod:`~metalm.training.checkpoint`,
metrics and the loss plot in :mod:`~metalm.training.metrics`, train.log and the feature cache's counts in
:mod:`~metalm.training.run_log`, DDP / FSDP2 / DeepSpeed setup in :mod:`~metalm.training.parallel`, the
optimizer and schedule in :mod:`~metalm.training.optimizer`, the command line in
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

import logging
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from metalm.training.checkpoint import (
    CHECKPOINT_PATTERN,
    SLOW_CHECKPOINT_ENV,
    CheckpointWriter,
    find_checkpoint,
    verify_checkpoint,
)
from metalm.training.config import ConfigError, TrainConfig
from metalm.training.connector_alignment import align_connectors
from metalm.training.metrics import METRIC_COLUMNS, LogWindow, MetricsLog, plot_loss_curve, reduce_step
from metalm.training.model_setup import build_model_for_training, check_packing, describe_model
from metalm.training.optimizer import build_optimizer, build_scheduler
from metalm.training.parallel import setup_parallelism, shard_model, unwrap_model
from metalm.training.run_log import (
    FeatureCacheMonitor,
    log_start,
    log_summary,
    per_stream_columns,
    run_logging,
)
from metalm.training.run_state import (
    Progress,
    TrainResult,
    agree_on_resume_point,
    gather_data_state,
    restore_progress,
    restore_rng,
    trainer_state,
)
from metalm.training.step import MicroBatch, train_step
from metalm.training.validation import ValidationSet

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
        self.feature_cache: FeatureCacheMonitor | None = None  # run.feature_cache
        self.validation = ValidationSet()

    def train(self) -> TrainResult:
        """Set up the processes, train to ``optim.max_steps`` (resuming if asked), save ``final/``."""
        self.parallel = setup_parallelism(self.config.run, self.config.optim)
        self.accelerator, self.fsdp, self.deepspeed = (
            self.parallel.accelerator,
            self.parallel.fsdp,
            self.parallel.deepspeed,
        )
        # bf16 autocast for a model accelerate did not wrap (FSDP); accelerate's DDP wrapper has its own.
        self.mixed_precision = self.parallel.mixed_precision  # `auto` resolved
        if self.fsdp and self.mixed_precision == "bf16":
            self.autocast_dtype = torch.bfloat16
        main = self.accelerator.is_main_process
        if main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        self.accelerator.wait_for_everyone()
        with run_logging(self.output_dir, main):
            return self._run()

    def _run(self) -> TrainResult:
        from accelerate.utils import set_seed

        from metalm.data.records import SkipReport

        run, optim = self.config.run, self.config.optim
        log_start(self.config, self.accelerator, self.output_dir, self.parallel)
        resume = agree_on_resume_point(self.accelerator, self.output_dir, run.resume)
        set_seed(run.seed)
        model = self._build_model(resume)
        check_packing(self.config, model, fsdp=self.fsdp)
        self._build_data(SkipReport())
        if resume is None:  # an initialisation: a resumed run has its trained connectors already
            align_connectors(model, self.processor, self.config, self.train_data.streams)
        self._prepare_model_and_optimizer(model)
        self.feature_cache = FeatureCacheMonitor.attach(
            run.feature_cache, self._unwrapped(), self.processor, sharded=self.fsdp or self.deepspeed
        )
        columns = per_stream_columns(self.validation.streams, self.train_data, self.feature_cache is not None)
        self.metrics = MetricsLog(self.output_dir, self.accelerator.is_main_process, run.tensorboard, columns)
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
        restore_rng(resume, self.accelerator.process_index, run.seed, progress.step)  # last before the loop
        start_step = progress.step
        self._train_loop(progress, result)
        return self._finish(progress, result, trained=progress.step > start_step)

    # --- setting up -----------------------------------------------------------------------------------
    def _build_model(self, resume: Path | None) -> torch.nn.Module:
        """The model to train (and `self.processor`, `self._lora`)."""
        built = build_model_for_training(self.config, resume, fsdp=self.fsdp, deepspeed=self.deepspeed)
        self.processor, self._lora = built.processor, built.lora
        return built.model

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
            transcripts={e.name: e.transcript_loss for e in cfg.model.encoders or [] if e.transcript_loss},
            grad_accum=cfg.optim.grad_accum,
        )
        self.validation = ValidationSet.draw(val_data, cfg.run.eval_batches)

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

    def _restore(self, resume: Path | None) -> Progress:
        """Optimizer, schedule, data position and metrics history from `resume` (None: a fresh start)."""
        if resume is None:
            self.metrics.reset([])
            return Progress()
        return restore_progress(
            resume,
            model=self._unwrapped(),
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            train_data=self.train_data,
            metrics=self.metrics,
            accelerator=self.accelerator,
            batch_size=self.config.optim.batch_size,
            deepspeed=self.deepspeed,
        )

    # --- the loop -------------------------------------------------------------------------------------
    def _train_loop(self, progress: Progress, result: TrainResult) -> None:
        """One :func:`train_step` per optimizer step; metrics rows, validation and checkpoints when due."""
        from tqdm.auto import tqdm

        from metalm.training.loader import BatchLoader

        run, optim = self.config.run, self.config.optim
        max_grad_norm = optim.grad_clip if optim.grad_clip is not None else math.inf  # inf: measure only
        # Train loss per stream (sum, micro-batches) when each micro-batch comes from one stream.
        streams = self.train_data.names if self.train_data.mix == "batch" else []
        window = LogWindow(streams, self.accelerator.device)
        self.model.train()
        main = self.accelerator.is_main_process
        bar = tqdm(
            total=optim.max_steps,
            initial=progress.step,
            desc="train",
            unit="step",
            disable=not main,
            dynamic_ncols=True,
        )
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
                loss, grad_norm, tokens, stream_sums, aux = reduce_step(
                    measured, sources, streams, self.accelerator, optim.grad_accum
                )
                seconds = time.perf_counter() - started
                progress.elapsed += seconds
                progress.tokens += tokens
                result.losses[progress.step] = loss
                window.add(loss, grad_norm, tokens, seconds, stream_sums, aux)
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

    def _due_row(
        self, progress: Progress, window: LogWindow, result: TrainResult, bar: Any
    ) -> dict[str, Any]:
        """The metrics row of this step: train means every ``run.log_every`` steps, validation every
        ``run.eval_every`` steps, both at the last step; empty when neither is due."""
        run, step = self.config.run, progress.step
        last = step == self.config.optim.max_steps
        row: dict[str, Any] = {}
        if (run.log_every and step % run.log_every == 0) or last:
            row = window.take_row(self.scheduler.get_last_lr()[0], progress.tokens, progress.elapsed)
            if self.feature_cache is not None:
                row.update(self.feature_cache.row())
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

    def evaluate(self) -> dict[str, float]:
        """Token-weighted validation loss over the fixed validation batches (all processes together):
        ``{"val_loss": ..., "val_loss_<stream>": ...}``; empty without validation data."""
        return self.validation.evaluate(self.model, self.accelerator, self.autocast_dtype)

    # --- checkpoints and the end ----------------------------------------------------------------------
    def _unwrapped(self) -> torch.nn.Module:
        return unwrap_model(self.model, self.accelerator)

    def _save_checkpoint(self, progress: Progress) -> Path:
        data_state = gather_data_state(self.train_data, self.accelerator)
        state = trainer_state(
            progress, self.accelerator.num_processes, self.metrics.history, data_state["stats"], self.config
        )
        return self.checkpoints.save(
            progress.step, self.model, self.optimizer, self.scheduler, self.processor, data_state, state
        )

    def _save_final(self, step: int) -> Path:
        if self._lora is not None:
            # final/ is a plain MetaLM: fold the adapters into the decoder (every process: DDP replicas).
            from metalm.training.lora import merge_lora

            merge_lora(self._unwrapped(), self._lora)
            self._lora = None
        return self.checkpoints.save_final(step, self.model, self.processor)

    def _finish(self, progress: Progress, result: TrainResult, trained: bool) -> TrainResult:
        if not trained and self.validation:
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
        if self.feature_cache is not None:
            self.feature_cache.log_total()
        log_summary(result, gather_data_state(self.train_data, self.accelerator), self.train_data.seq_len)
        return result


if __name__ == "__main__":  # `python -m metalm.training.trainer`: the command line, which imports this module
    from metalm.training.cli import main

    main()
