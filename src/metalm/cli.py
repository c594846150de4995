"""The `metalm` command line. Each sub-command lives beside the code it drives; this file only wires them."""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

# (command, module, function adding its parser). Imported lazily so `metalm --help` stays fast.
COMMANDS = [
    ("quickstart", "metalm.quickstart", "add_quickstart_parser"),
    ("train", "metalm.training.cli", "add_train_parser"),
    ("data", "metalm.data.cli", "add_data_parser"),
    ("eval", "metalm.evaluation.runner", "add_eval_parser"),
    ("generate", "metalm.serving.cli", "add_generate_parser"),
    ("chat", "metalm.serving.cli", "add_chat_parser"),
    ("serve", "metalm.serving.cli", "add_serve_parser"),
    ("lm-eval", "metalm.cli", "add_lm_eval_parser"),
]


def add_lm_eval_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "lm-eval",
        help="lm-evaluation-harness with the `metalm` model registered (arguments as for `lm_eval`)",
        description="Runs lm-evaluation-harness's own CLI with `--model metalm` available, e.g.\n"
        "  metalm lm-eval run --model metalm --model_args pretrained=DIR,encode_context=true --tasks ...",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        add_help=False,
    )
    p.add_argument("args", nargs=argparse.REMAINDER)

    def run(args: argparse.Namespace) -> int:
        from metalm.evaluation.lm_eval_adapter import main as lm_eval_main

        lm_eval_main(args.args)
        return 0

    p.set_defaults(func=run)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="metalm",
        description="MetaLM: a causal LM as the general-purpose interface, with docked bidirectional encoders.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    wanted = None
    if argv:
        wanted = next((a for a in argv if not a.startswith("-")), None)
    for name, module, adder in COMMANDS:
        # Only the chosen command's module is imported (all of them for `metalm --help`).
        if wanted in (None, name) or wanted not in {c[0] for c in COMMANDS}:
            getattr(importlib.import_module(module), adder)(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["lm-eval"]:  # every argument, --help included, belongs to lm_eval's own CLI
        from metalm.evaluation.lm_eval_adapter import main as lm_eval_main

        lm_eval_main(argv[1:])
        return 0
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    from metalm.model.loading import ModelLoadError, check_config

    try:
        # transformers reads a model folder's config.json before any metalm code runs; check it first so
        # that a broken one is one line, like every other broken model folder (ModelLoadError).
        model = getattr(args, "model", None)
        if isinstance(model, str) and Path(model).is_dir():
            check_config(model)
        result = args.func(args)
    except ModelLoadError as err:
        print(f"metalm {args.command}: error: {err}", file=sys.stderr)
        return 1
    return int(result or 0)


if __name__ == "__main__":
    raise SystemExit(main())
