"""The `metalm` command line itself: start-up cost and argument order (issue #23, items 2 and 9)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from metalm.cli import build_parser, parse_args

SRC = str(Path(__file__).resolve().parents[1] / "src")


def _run_python(code: str) -> str:
    env = {"PYTHONPATH": SRC, "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_help_imports_neither_torch_nor_transformers():
    """`metalm --help` lists every command without importing a command's module (it took 8.5 s)."""
    out = _run_python(
        "import sys, contextlib, io\n"
        "from metalm.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()) as text, contextlib.suppress(SystemExit):\n"
        "    main(['--help'])\n"
        "assert 'serve' in text.getvalue() and 'quickstart' in text.getvalue()\n"
        "print(sorted(m for m in ('torch', 'transformers', 'pydantic') if m in sys.modules))\n"
    )
    assert out.strip() == "[]"


def test_data_validate_does_not_import_torch(tmp_path):
    """`metalm data validate` needs the record schema only (it took 8-11 s per call)."""
    good = tmp_path / "good.jsonl"
    good.write_text('{"kind": "text", "text": "hello"}\n', encoding="utf-8")
    out = _run_python(
        "import sys\n"
        "from metalm.cli import main\n"
        f"assert main(['data', 'validate', {str(good)!r}]) == 0\n"
        "print('torch' in sys.modules)\n"
    )
    assert out.strip().endswith("False")


def test_import_metalm_still_registers_the_auto_classes():
    """`import metalm` before transformers (the README's order) still registers MetaLM with the Auto classes."""
    out = _run_python(
        "import sys\n"
        "import metalm\n"
        "assert 'torch' not in sys.modules\n"
        "from transformers import AutoModelForCausalLM\n"
        "from transformers.models.auto.configuration_auto import CONFIG_MAPPING\n"
        "from transformers.models.auto.processing_auto import PROCESSOR_MAPPING\n"
        "config = CONFIG_MAPPING['metalm']\n"
        "print(config.__name__, AutoModelForCausalLM._model_mapping[config].__name__,\n"
        "      PROCESSOR_MAPPING[config].__name__, metalm.Encode.__name__)\n"
    )
    assert out.split() == ["MetaLMConfig", "MetaLMForCausalLM", "MetaLMProcessor", "Encode"]


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "cfg.yaml", "--restart", "optim.max_steps=5"],
        ["train", "cfg.yaml", "optim.max_steps=5", "--restart"],
        ["train", "cfg.yaml", "optim.lr=1e-4", "--restart", "optim.max_steps=5"],
    ],
)
def test_train_takes_overrides_before_or_after_the_flags(argv):
    args = parse_args(build_parser(argv), argv)
    assert args.resume == "restart"
    assert args.overrides[-1] == "optim.max_steps=5" and len(args.overrides) == len(argv) - 3


def test_quickstart_takes_overrides_after_its_flags():
    argv = ["quickstart", "--max-steps", "3", "optim.lr=1e-4", "--output-dir", "runs/x", "run.seed=1"]
    args = parse_args(build_parser(argv), argv)
    assert args.overrides == ["optim.lr=1e-4", "run.seed=1"] and args.max_steps == 3


def test_a_leftover_that_is_no_override_is_still_an_error(capsys):
    argv = ["train", "cfg.yaml", "--restart", "optim.max_steps=5", "--bogus"]
    with pytest.raises(SystemExit):
        parse_args(build_parser(argv), argv)
    assert "unrecognized arguments: optim.max_steps=5 --bogus" in capsys.readouterr().err


@pytest.mark.parametrize(("flag", "cached"), [([], True), (["--no-feature-cache"], False)])
def test_eval_serves_frozen_encoders_from_the_feature_cache_unless_told_not_to(flag, cached):
    argv = ["eval", "runs/x/final", "--task", "easyvqa", "--shots", "0,4", *flag]
    assert parse_args(build_parser(argv), argv).feature_cache is cached
