"""Validation during training: fixed batches drawn once, before training, and their token-weighted loss
(per stream when there are several), over all processes together."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from metalm.training.step import autocast

__all__ = ["ValidationSet"]

logger = logging.getLogger("metalm.training")


@dataclass
class ValidationSet:
    """The validation batches, each batch's rows' stream names (`rows`), and the stream names."""

    streams: list[str] = field(default_factory=list)
    batches: list[dict[str, Any]] = field(default_factory=list)
    rows: list[list[str]] = field(default_factory=list)

    @classmethod
    def draw(cls, val_data: Any, n_batches: int) -> ValidationSet:
        """`n_batches` batches of `val_data` (a DataStream, or None: no validation)."""
        if val_data is None:
            logger.info("no validation data: validation loss is not computed")
            return cls()
        found = cls(streams=list(val_data.names))
        for _ in range(n_batches):
            found.batches.append(val_data.next_batch())
            found.rows.append([name for name, _ in val_data.last_sources])
        if not found.batches:
            logger.info("no validation data: validation loss is not computed")
        return found

    def __bool__(self) -> bool:
        return bool(self.batches)

    @torch.no_grad()
    def evaluate(
        self, model: torch.nn.Module, accelerator: Any, autocast_dtype: torch.dtype | None
    ) -> dict[str, float]:
        """``{"val_loss": ..., "val_loss_<stream>": ...}``; empty without validation batches. Leaves the
        model in training mode."""
        if not self.batches:
            return {}
        from accelerate.utils import send_to_device

        acc, names = accelerator, self.streams
        model.eval()
        # Row sums of token losses and token counts, per stream: [streams, 2].
        total = torch.zeros(len(names), 2, dtype=torch.float64, device=acc.device)
        for batch, rows in zip(self.batches, self.rows):
            batch = send_to_device(batch, acc.device)
            labels = batch.pop("labels")[:, 1:]
            with autocast(acc.device.type, autocast_dtype):
                logits = model(**batch).logits[:, :-1].float()
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
        model.train()
        return _losses(names, acc.reduce(total, reduction="sum"))


def _losses(names: list[str], total: torch.Tensor) -> dict[str, float]:
    """The overall and (several streams) per-stream mean token losses from [streams, (sum, count)]."""
    out = {}
    if total[:, 1].sum() > 0:
        out["val_loss"] = float(total[:, 0].sum() / total[:, 1].sum())
    if len(names) > 1:
        for name, (loss_sum, n) in zip(names, total.tolist()):
            if n > 0:
                out[f"val_loss_{name}"] = loss_sum / n
    return out
