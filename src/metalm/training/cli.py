"""`metalm train CONFIG [key=value ...]`: the training command line."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

from metalm.training.config import ConfigError, load_config

__all__ = ["add_train_parser", "main", "train_main"]


class _TqdmHandler(logging.Handler):
    """Log lines written above the progress bar instead of through it."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm.auto import tqdm

        try:
            tqdm.write(self.format(record))
        except Exception:  # logging must never crash training
            self.handleError(record)


def train_main(config_path: str, overrides: list[str], resume: bool | str | None = None) -> None:
    """`metalm train CONFIG [key=value ...]`: load the config, train, print where the results are."""
    from metalm.data.records import RecordError
    from metalm.model.loading import ModelLoadError
    from metalm.training.trainer import train

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
    try:
        result = train(config)
    except (RecordError, ConfigError, ModelLoadError) as err:  # e.g. a broken init_from folder
        raise SystemExit(f"error: {err}") from None
    _end_process_group()
    if int(os.environ.get("RANK", "0")) != 0:
        return
    print(f"final model: {result.final_dir}")
    print(f"metrics:     {result.metrics_path} (and metrics.csv, loss_curve.png)")
    if result.last_loss is not None:
        val = f", validation loss {result.last_val_loss:.4f}" if result.last_val_loss is not None else ""
        print(f"step {result.step}: train loss {result.last_loss:.4f}{val}")


def _end_process_group() -> None:
    """After a run of several processes has ended well: destroy the process group while the interpreter is
    whole. Left to interpreter exit, gloo's worker threads now and then abort a finished process
    ("terminate called without an active exception", pytorch/pytorch#190489). Not after a failure: a
    destroy beside ranks still in a collective can hang (torchtitan does the same)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def add_train_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Wire `metalm train CONFIG [key=value ...] [--resume/--no-resume | --restart]` into an argparse subparsers."""
    p = subparsers.add_parser(
        "train",
        help="train a MetaLM from a YAML config",
        description="Train a MetaLM (semi-causal LM). Overrides use key paths, e.g. optim.lr=1e-4 "
        "run.output_dir=runs/x data.seq_len=64 data.streams.0.weight=2. Run under `accelerate launch` "
        "or `torchrun` for several processes.",
    )
    p.add_argument("config", help="YAML config file, e.g. configs/quickstart.yaml")
    p.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="config overrides (before or after the flags)"
    )
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
    from metalm.cli import parse_args

    args = parse_args(parser, ["train", *(argv if argv is not None else sys.argv[1:])])
    args.func(args)


if __name__ == "__main__":
    main()
