"""Arguments and set-up shared by the ``metalm generate``, ``chat`` and ``serve`` commands."""

from __future__ import annotations

import argparse

from metalm.data.layouts import CHAT_HISTORY

__all__ = ["add_chat_history_arg", "add_model_args", "quiet_loading"]


def quiet_loading() -> None:
    # The weight-loading progress bar would land in the middle of a terminal answer.
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="folder of a saved metalm model")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 … (default: cuda if available)")


def add_chat_history_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--chat-history", choices=list(CHAT_HISTORY), default="latest",
        help="latest: answer the last question alone (with the image still in view), in the layout the model "
        "trained on; demonstrations: earlier turns stay in the prompt as few-shot demonstrations",
    )  # fmt: skip
