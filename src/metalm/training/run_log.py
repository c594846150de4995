"""What a training run reports beyond the metrics rows: ``train.log`` (the main process's voice), the
opening line, the feature cache's hit rates (``run.feature_cache``) and the closing summary."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from metalm.training.config import TrainConfig, config_to_dict
from metalm.training.run_state import TrainResult

__all__ = ["FeatureCacheMonitor", "log_start", "log_summary", "per_stream_columns", "run_logging"]

logger = logging.getLogger("metalm.training")


@contextlib.contextmanager
def run_logging(output_dir: Path, main: bool) -> Iterator[None]:
    """train.log on the main process; the other processes only report problems (one voice)."""
    handler = None
    if main:
        handler = logging.FileHandler(output_dir / "train.log", encoding="utf-8")
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


def log_start(config: TrainConfig, accelerator: Any, output_dir: Path, parallel: Any) -> None:
    """config.yaml (the resolved config) and the line on devices, processes and precision."""
    if accelerator.is_main_process:
        (output_dir / "config.yaml").write_text(
            yaml.safe_dump(config_to_dict(config), sort_keys=False), encoding="utf-8"
        )
    precision, asked = parallel.mixed_precision, config.run.mixed_precision
    logger.info(
        "training on %s, %d process(es)%s, mixed precision %s",
        accelerator.device,
        accelerator.num_processes,
        " (FSDP2)" if parallel.fsdp else " (DeepSpeed)" if parallel.deepspeed else "",
        precision if asked == precision else f"{precision} ({asked})",
    )


def per_stream_columns(val_streams: list[str], train_data: Any, feature_cache: bool) -> list[str]:
    """Metrics columns beyond METRIC_COLUMNS: per-stream validation and (``mix: batch``) train losses,
    and the feature cache's hit rate."""
    columns = [f"val_loss_{n}" for n in val_streams] if len(val_streams) > 1 else []
    if len(train_data.names) > 1 and train_data.mix == "batch":
        columns = [f"loss_{n}" for n in train_data.names] + columns
    if feature_cache:
        columns.append("feature_cache_hit_rate")
    if getattr(train_data, "transcripts", None):  # model.encoders[].transcript_loss
        columns.append("transcript_loss")
    if any(s.config.typed_twin for s in getattr(train_data, "streams", [])):  # a stream's typed_twin
        columns.append("typed_twin_loss")
    return columns


class FeatureCacheMonitor:
    """`run.feature_cache`: a FeatureCache serving the encoders' frozen lower parts, and its hit counts
    (per logged row, and over the run)."""

    def __init__(self, cache: Any) -> None:
        from metalm.model.feature_cache import CacheStats

        self.cache, self.total = cache, CacheStats()

    @classmethod
    def attach(
        cls, setting: bool | str, model: Any, processor: Any, *, sharded: bool
    ) -> FeatureCacheMonitor | None:
        """Attach a cache to the (unwrapped) model's encoders per `setting`; None when there is none to
        attach (off, FSDP or DeepSpeed, or no encoder with frozen lower layers)."""
        from metalm.model.feature_cache import FeatureCache, cache_dir

        if setting is False:
            return None
        if sharded:
            # Sharded weights cannot be fingerprinted outside the forward pass: train without the cache.
            logger.warning("run.feature_cache is off: it does not run with FSDP or DeepSpeed yet")
            return None
        directory = cache_dir(setting)
        cache = FeatureCache(directory, preprocessors=processor.preprocessors)
        names = cache.attach(model)
        if not names:
            logger.info(
                "run.feature_cache: no encoder has frozen lower layers (trainable_layers); nothing to cache"
            )
            return None
        logger.info("feature cache for encoder(s) %s in %s", ", ".join(names), directory)
        return cls(cache)

    def row(self) -> dict[str, float]:
        """The cache's hit rate over the lookups since the last logged row (training and validation)."""
        from metalm.model.feature_cache import CacheStats

        stats, self.cache.stats = self.cache.stats, CacheStats()
        for name, value in vars(stats).items():
            setattr(self.total, name, getattr(self.total, name) + value)
        if stats.corrupt:
            logger.warning("feature cache: %d unreadable entries recomputed", stats.corrupt)
        return {"feature_cache_hit_rate": round(stats.hit_rate, 4)} if stats.lookups else {}

    def log_total(self) -> None:
        self.row()  # count the lookups since the last row
        total = self.total
        logger.info(
            "feature cache: %d rows looked up, hit rate %.3f (%d from memory, %d from disk), %d "
            "unreadable entries recomputed",
            total.lookups,
            total.hit_rate,
            total.memory_hits,
            total.disk_hits,
            total.corrupt,
        )


def log_summary(result: TrainResult, data_state: dict[str, Any], seq_len: int) -> None:
    """The closing lines of train.log: the data (every process's finds), bad records, the final losses."""
    from metalm.data.records import SkipReport

    stats = data_state["stats"]
    logger.info(
        "data: %d samples (%s); %d truncated to seq_len %d, %d skipped with nothing to train on",
        stats["samples"],
        ", ".join(f"{k} {v}" for k, v in data_state["per_stream"].items()),
        stats["truncated"],
        seq_len,
        stats["skipped_no_target"],
    )
    if stats.get("inputs_truncated"):
        logger.info(
            "instruction inputs: %d cut to fit the text encoder / seq_len (classification text, word by word)",
            stats["inputs_truncated"],
        )
    skipped = data_state["skip_report"]
    report = SkipReport(skipped["count"], [tuple(i) for i in skipped["items"]])
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


def _skip_summary(report: Any, limit: int = 50) -> str:
    """Like SkipReport.summary, for records located by file:line or by stream and index."""
    lines = [f"skipped {report.count} bad record{'s' if report.count != 1 else ''}:"]
    for path, line, fld, reason in report.items[:limit]:
        where = f"{path}:{line}" if line is not None else str(path)
        lines.append(f"  {where}: {f'field {fld!r}: ' if fld else ''}{reason}")
    if report.count > limit:
        lines.append(f"  ... and {report.count - min(limit, len(report.items))} more")
    return "\n".join(lines)
