"""The `metalm` command line. Each sub-command lives beside the code it drives; this file only wires them."""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from metalm.model.loading import ModelLoadError, check_config  # standard library only: cheap

# (command, module, function adding its parser, one-line help for `metalm --help`). A command's module is
# imported only when that command runs: `metalm --help` lists them from here without importing torch.
COMMANDS = [
    (
        "quickstart",
        "metalm.quickstart",
        "add_quickstart_parser",
        "pre-train a small MetaLM on packaged data and evaluate it",
    ),
    ("train", "metalm.training.cli", "add_train_parser", "train a MetaLM from a YAML config"),
    ("data", "metalm.data.cli", "add_data_parser", "list, export and validate datasets"),
    (
        "eval",
        "metalm.evaluation.eval_cli",
        "add_eval_parser",
        "evaluate a saved model on built-in or user tasks (zero/few-shot)",
    ),
    (
        "generate",
        "metalm.serving.cli",
        "add_generate_parser",
        "generate text for a question, a prompt or an image",
    ),
    ("chat", "metalm.serving.cli", "add_chat_parser", "multi-turn chat in the terminal"),
    (
        "serve",
        "metalm.serving.cli",
        "add_serve_parser",
        "serve a model over HTTP (OpenAI-compatible API + chat page)",
    ),
    (
        "lm-eval",
        "metalm.cli",
        "add_lm_eval_parser",
        "lm-evaluation-harness with the `metalm` model registered",
    ),
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
    """The `metalm` parser; only the command named in `argv` gets its full parser (its module imported)."""
    parser = argparse.ArgumentParser(
        prog="metalm",
        description="MetaLM: a causal LM as the general-purpose interface, with docked bidirectional encoders.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    wanted = next((a for a in argv or [] if not a.startswith("-")), None)
    for name, module, adder, summary in COMMANDS:
        if name == wanted:
            getattr(importlib.import_module(module), adder)(sub)
        else:  # listed in `metalm --help`; never parsed, as the command named is another
            sub.add_parser(name, help=summary)
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """`parser.parse_args`, except that KEY=VALUE overrides may also come after the flags
    (`metalm train CFG --restart optim.max_steps=5`): argparse stops filling a positional list at the first
    flag, so the words it leaves over are added to `overrides` when the command takes them."""
    args, extra = parser.parse_known_args(argv)
    if extra and isinstance(getattr(args, "overrides", None), list):
        if all("=" in word and not word.startswith("-") for word in extra):
            args.overrides = [*args.overrides, *extra]
            return args
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["lm-eval"]:  # every argument, --help included, belongs to lm_eval's own CLI
        from metalm.evaluation.lm_eval_adapter import main as lm_eval_main

        lm_eval_main(argv[1:])
        return 0
    parser = build_parser(argv)
    args = parse_args(parser, argv)
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
