"""Training metrics: the rows of ``metrics.jsonl`` / ``metrics.csv`` (+ TensorBoard) and the loss curve."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from metalm.training.step import AUX_LOSSES

if TYPE_CHECKING:
    from metalm.training.step import StepResult

__all__ = ["METRIC_COLUMNS", "LogWindow", "MetricsLog", "plot_loss_curve", "reduce_step"]

logger = logging.getLogger("metalm.training")

METRIC_COLUMNS = ["step", "loss", "lr", "tokens_per_s", "grad_norm", "val_loss", "tokens", "elapsed_s"]


class MetricsLog:
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
        """Append one row (it needs a "step") to the history and the files."""
        self.history.append(row)
        if not self.enabled:
            return
        with open(self.jsonl, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")
        with open(self.csv, "a", newline="", encoding="utf-8") as fh:
            csv.DictWriter(fh, fieldnames=self.columns, extrasaction="ignore").writerow(row)
        if self.tb is not None:
            self._write_tensorboard(row)

    def _write_tensorboard(self, row: dict[str, Any]) -> None:
        step = row["step"]
        for key in ("loss", "lr", "tokens_per_s", "grad_norm", *AUX_LOSSES):
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


class LogWindow:
    """What the steps since the last metrics row measured; a row reports their means.

    `streams`: the train streams whose losses are kept apart (``mix: batch``: each micro-batch comes from
    one stream); their sums and counts are a ``[streams, 2]`` float64 tensor on `device`."""

    def __init__(self, streams: list[str], device: torch.device | str) -> None:
        self.streams = streams
        self.stream_sums = torch.zeros(len(streams), 2, dtype=torch.float64, device=device)
        self._clear()

    def _clear(self) -> None:
        self.loss, self.grad_norm, self.tokens, self.seconds, self.steps = 0, 0, 0, 0, 0
        self.aux: dict[str, list[float]] = {}  # auxiliary loss -> [sum, steps]

    def add(
        self,
        loss: float,
        grad_norm: float,
        tokens: int,
        seconds: float,
        stream_sums: torch.Tensor,
        aux: dict[str, float] | None = None,
    ) -> None:
        """One optimizer step's (process-reduced) loss, grad norm, tokens, duration and stream losses, and
        the means of the auxiliary losses its micro-batches returned (`transcript_loss`, `typed_twin_loss`)."""
        for key, value in (aux or {}).items():
            total = self.aux.setdefault(key, [0.0, 0])
            total[0] += value
            total[1] += 1
        self.loss += loss
        self.grad_norm += grad_norm
        self.tokens += tokens
        self.seconds += seconds
        self.steps += 1
        self.stream_sums += stream_sums

    def take_row(self, lr: float, tokens_total: int, elapsed: float) -> dict[str, Any]:
        """The metrics row for the steps since the last one (without "step"); starts a new window."""
        n = self.steps
        row: dict[str, Any] = {
            "loss": self.loss / n,
            "lr": lr,
            "tokens_per_s": self.tokens / max(self.seconds, 1e-9),
            "grad_norm": self.grad_norm / n,
            "tokens": tokens_total,
            "elapsed_s": round(elapsed, 3),
        }
        if len(self.streams) > 1:
            for name, (total, count) in zip(self.streams, self.stream_sums.tolist()):
                if count:
                    row[f"loss_{name}"] = total / count
        for key, (total, steps) in self.aux.items():  # part of `loss` (and of its stream's), shown alone
            row[key] = total / steps
        self._clear()
        self.stream_sums.zero_()
        return row


def reduce_step(
    measured: StepResult, sources: list[set[str]], streams: list[str], accelerator: Any, grad_accum: int
) -> tuple[float, float, int, torch.Tensor, dict[str, float]]:
    """One step's mean loss, grad norm and token count over all processes, its per-stream loss sums
    (a micro-batch counts for a stream when all its rows come from it; `sources`: each one's streams), and
    the mean of each auxiliary loss over the micro-batches that returned it (any process)."""
    acc = accelerator
    stream_sums = torch.zeros(len(streams), 2, dtype=torch.float64, device=acc.device)
    for loss, names in zip(measured.micro_losses, sources):
        if streams and len(names) == 1:
            k = streams.index(next(iter(names)))
            stream_sums[k, 0] += loss.double()
            stream_sums[k, 1] += 1
    grad_norm = float(measured.grad_norm) if measured.grad_norm is not None else 0.0
    aux = [measured.aux_losses.get(key, []) for key in AUX_LOSSES]
    stats = torch.tensor(
        [float(measured.loss_sum) / grad_accum, grad_norm, measured.tokens]
        + [x for values in aux for x in (float(sum(values)), len(values))],
        dtype=torch.float64,
        device=acc.device,
    )
    if acc.num_processes > 1:
        stats = acc.reduce(stats, reduction="sum")
        stats[:2] /= acc.num_processes
        stream_sums = acc.reduce(stream_sums, reduction="sum")
    means = {
        key: float(stats[3 + 2 * i] / stats[4 + 2 * i])
        for i, key in enumerate(AUX_LOSSES)
        if stats[4 + 2 * i]
    }
    return float(stats[0]), float(stats[1]), int(stats[2]), stream_sums, means


def _loss_series(history: list[dict[str, Any]], key: str) -> list[tuple[int, float]]:
    return [(r["step"], r[key]) for r in history if key in r]


def _streams_in(history: list[dict[str, Any]]) -> list[str]:
    """Streams with their own losses: validation ones first, then train-only ones."""
    streams = sorted({k[len("val_loss_") :] for r in history for k in r if k.startswith("val_loss_")})
    return streams + sorted(
        {k[len("loss_") :] for r in history for k in r if k.startswith("loss_")} - set(streams)
    )


def plot_loss_curve(history: list[dict[str, Any]], path: str | Path, title: str = "") -> None:
    """Train and validation loss against step as a PNG (matplotlib's Agg canvas: no display needed).
    With several streams, their own train (mix: batch) and validation losses are drawn too."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.8), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    streams = _streams_in(history)
    colors = dict(zip(streams, ("tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:olive")))
    train = _loss_series(history, "loss")
    if train:
        ax.plot(
            *zip(*train), label="train loss", color="tab:blue", linewidth=1.0, alpha=0.5 if streams else 1.0
        )
    for name in streams:
        color = colors.get(name, "tab:gray")
        if stream_train := _loss_series(history, f"loss_{name}"):
            ax.plot(*zip(*stream_train), color=color, linewidth=1.0, label=f"train: {name}")
        if stream_val := _loss_series(history, f"val_loss_{name}"):
            ax.plot(
                *zip(*stream_val),
                color=color,
                linestyle="--",
                marker="o",
                markersize=3,
                label=f"validation: {name}",
            )
    for key, color in zip(AUX_LOSSES, ("tab:cyan", "tab:gray")):
        if series := _loss_series(history, key):
            ax.plot(*zip(*series), color=color, linewidth=1.0, linestyle=":", label=f"{key} (part of train)")
    if val := _loss_series(history, "val_loss"):
        ax.plot(
            *zip(*val),
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
