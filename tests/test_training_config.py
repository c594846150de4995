"""Training configs: YAML loading with dotted overrides and `extends`, errors that name the file and
the key, the learning-rate schedules built from `optim`, and every preset under configs/ validating (the
decoder's size checked on the meta device)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from metalm.training.config import ConfigError, load_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def write_yaml(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


MINIMAL = """
model:
  decoder: {model_type: llama, hidden_size: 64}
  tokenizer: packaged:minilm-l6
data:
  streams:
    - {source: pydoc}
optim: {lr: 1e-4}
"""


def test_config_loads_and_overrides(tmp_path):
    path = write_yaml(tmp_path / "x.yaml", MINIMAL)
    cfg = load_config(
        path, ["optim.lr=3e-4", "run.output_dir=runs/x", "data.seq_len=64", "data.streams.0.weight=2"]
    )
    assert cfg.optim.lr == 3e-4 and cfg.run.output_dir == "runs/x" and cfg.data.seq_len == 64
    assert cfg.data.streams[0].weight == 2.0 and cfg.data.streams[0].name == "pydoc"
    assert cfg.optim.betas == (0.9, 0.95)  # default
    # `lr: 1e-4` is a string to YAML 1.1; it is read as the number it looks like.
    assert load_config(path).optim.lr == 1e-4
    # A bare `no` is false to YAML; for mixed_precision it means "no".
    assert load_config(path, ["run.mixed_precision=no"]).run.mixed_precision == "no"


@pytest.mark.parametrize(
    ("text", "overrides", "message"),
    [
        (MINIMAL.replace("lr: 1e-4", "lr: 1e-4, bogus: 1"), [], "x.yaml: optim.bogus: unknown key"),
        (MINIMAL.replace("lr: 1e-4", "lr: abc"), [], "x.yaml: optim.lr: expected float, got 'abc'"),
        (MINIMAL, ["optim.lr=abc"], "override 'optim.lr=abc': optim.lr: expected float, got 'abc'"),
        (MINIMAL, ["optim.lr"], "override 'optim.lr': expected key.path=value"),
        (MINIMAL, ["run.nope=1"], "override 'run.nope=1': run.nope: unknown key"),
        (MINIMAL, ["data.streams.5.weight=1"], "data.streams.5: index out of range"),
        (MINIMAL, ["run.mixed_precision=fp16"], "run.mixed_precision: expected one of 'auto', 'no', 'bf16'"),
        (MINIMAL, ["optim.batch_size=2.5"], "optim.batch_size: expected int, got 2.5"),
        (MINIMAL, ["run.resume=maybe"], "run.resume: expected bool"),
        (
            MINIMAL,
            ["data.streams.0.source=missing.jsonl"],
            "data.streams[0].source: 'missing.jsonl' is neither",
        ),
        (MINIMAL, ["data.streams.0.weight=-1"], "data.streams[0].weight: must be > 0"),
        (MINIMAL, ["model.semi_causal={span_min: 9, span_max: 3}"], "span_min (9) > span_max (3)"),
        (MINIMAL, ["optim.decay_steps=10"], "optim.decay_steps: applies to schedule: wsd only"),
        (MINIMAL, ["optim.schedule=wsd", "optim.decay_steps=2000"], "exceed max_steps (1000)"),
        (MINIMAL, ["optim.schedule=step"], "optim.schedule: expected one of 'linear', 'cosine'"),
        (
            MINIMAL.replace("data:\n  streams:\n    - {source: pydoc}\n", ""),
            [],
            "x.yaml: data: missing required key",
        ),
    ],
)
def test_config_errors_name_file_and_key(tmp_path, text, overrides, message):
    path = write_yaml(tmp_path / "x.yaml", text)
    with pytest.raises(ConfigError) as err:
        load_config(path, overrides)
    assert message in str(err.value)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [  # the rate after each of 10 optimizer steps, warm-up 2, as fractions of optim.lr
        ([], [0.5, 1, 7 / 8, 6 / 8, 5 / 8, 4 / 8, 3 / 8, 2 / 8, 1 / 8, 0]),
        (["optim.schedule=constant"], [0.5, 1, 1, 1, 1, 1, 1, 1, 1, 1]),
        (["optim.schedule=wsd", "optim.decay_steps=4"], [0.5, 1, 1, 1, 1, 1, 0.75, 0.5, 0.25, 0]),
        (["optim.schedule=wsd"], [0.5, 1, 1, 1, 1, 1, 1, 1, 0.5, 0]),  # the last fifth
    ],
)
def test_learning_rate_schedules(tmp_path, overrides, expected):
    from metalm.training.optimizer import build_scheduler

    path = write_yaml(tmp_path / "x.yaml", MINIMAL)
    optim = load_config(path, ["optim.warmup_steps=2", "optim.max_steps=10", *overrides]).optim
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=optim.lr)
    scheduler = build_scheduler(optimizer, optim)
    rates = []
    for _ in range(10):
        optimizer.step()
        scheduler.step()
        rates.append(scheduler.get_last_lr()[0] / optim.lr)
    assert rates == pytest.approx(expected, abs=1e-9)


def test_config_missing_file_and_extends(tmp_path):
    with pytest.raises(ConfigError, match=r"nope\.yaml: no such config file"):
        load_config(tmp_path / "nope.yaml")
    write_yaml(tmp_path / "base.yaml", MINIMAL)
    child = write_yaml(tmp_path / "child.yaml", "extends: base.yaml\noptim: {batch_size: 3}\n")
    cfg = load_config(child)
    assert cfg.optim.batch_size == 3 and cfg.optim.lr == 1e-4
    bad = write_yaml(tmp_path / "bad.yaml", "extends: gone.yaml\n")
    with pytest.raises(ConfigError, match="gone.yaml: no such config file"):
        load_config(bad)


@pytest.mark.parametrize(
    "path", sorted([*CONFIGS.glob("*.yaml"), *CONFIGS.glob("ablations/*.yaml")]), ids=lambda p: p.name
)
def test_presets_validate(path):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = load_config(path)
    if cfg.init_from is not None:  # finetuning presets start from a saved model (not built here)
        assert cfg.model.decoder is None
        return
    if isinstance(
        cfg.model.decoder, str
    ):  # a pretrained decoder (a packaged one or a folder): not built here
        assert cfg.model.decoder.startswith("packaged:") or Path(cfg.model.decoder).is_absolute()
        return
    decoder = dict(cfg.model.decoder)
    config = AutoConfig.for_model(decoder.pop("model_type"), vocab_size=30522, **decoder)
    with torch.device("meta"):  # the architecture only: no memory, no weights
        n = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    expected = {"paper-lang.yaml": 1.3e9, "paper-vl.yaml": 3.4e8}.get(path.name)
    if expected:
        assert abs(n - expected) / expected < 0.05, n
