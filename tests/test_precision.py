"""`run.mixed_precision: auto` (issue #23 item 1): bf16 where it measured faster, fp32 elsewhere. The CPU
probe is monkeypatched, so these tests do not depend on the machine they run on."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from metalm.training import precision
from metalm.training.config import RunConfig, load_config
from tests.conftest import REAL_CPU_BF16_SPEEDUP as REAL_SPEEDUP  # conftest replaces the check for all tests

AVX2_ONLY = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma bmi2\n"
SAPPHIRE_RAPIDS = "flags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"
GRAVITON3 = "Features\t: fp asimd sve bf16 i8mm\n"


def _cpu(monkeypatch, native: bool | None, speedup: float | None) -> None:
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: native)

    def probe() -> float:
        if speedup is None:
            raise AssertionError("the timed check should not run here")
        return speedup

    monkeypatch.setattr(precision, "cpu_bf16_speedup", probe)
    monkeypatch.delenv("WORLD_SIZE", raising=False)


def test_cpuinfo_flags_name_native_bf16():
    assert precision.native_bf16_in_cpuinfo(AVX2_ONLY) is False
    assert precision.native_bf16_in_cpuinfo(SAPPHIRE_RAPIDS) is True
    assert precision.native_bf16_in_cpuinfo(GRAVITON3) is True
    assert precision.native_bf16_in_cpuinfo("model name : something\n") is None


def test_auto_is_fp32_on_a_cpu_without_native_bf16_without_timing(monkeypatch, caplog):
    _cpu(monkeypatch, native=False, speedup=None)
    with caplog.at_level(logging.INFO, logger="metalm.training.precision"):
        assert precision.resolve_mixed_precision("auto", "cpu") == "no"
    assert "auto -> fp32" in caplog.text and "no native bf16" in caplog.text


@pytest.mark.parametrize(("speedup", "expected"), [(2.0, "bf16"), (1.05, "no"), (0.3, "no")])
def test_auto_on_a_native_bf16_cpu_follows_the_timed_check(monkeypatch, speedup, expected):
    _cpu(monkeypatch, native=True, speedup=speedup)
    assert precision.resolve_mixed_precision("auto", "cpu") == expected


def test_auto_is_bf16_on_cuda_with_bf16(monkeypatch):
    monkeypatch.setattr(precision.torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert precision.resolve_mixed_precision("auto", "cuda") == "bf16"


def test_auto_stays_fp32_in_several_cpu_processes(monkeypatch):
    """Each process would time its own check; they must autocast alike, so no timing decides."""
    _cpu(monkeypatch, native=True, speedup=None)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert precision.resolve_mixed_precision("auto", "cpu") == "no"


def test_explicit_bf16_on_a_cpu_without_native_bf16_warns_with_the_measured_cost(monkeypatch, caplog):
    _cpu(monkeypatch, native=False, speedup=0.01)
    with caplog.at_level(logging.WARNING, logger="metalm.training.precision"):
        assert precision.resolve_mixed_precision("bf16", "cpu") == "bf16"
    assert "100.0x slower than fp32" in caplog.text
    _cpu(monkeypatch, native=True, speedup=None)  # native bf16: kept as asked, no check
    assert precision.resolve_mixed_precision("bf16", "cpu") == "bf16"
    assert precision.resolve_mixed_precision("no", "cpu") == "no"


def test_the_default_and_the_gemma_preset_are_auto():
    assert RunConfig().mixed_precision == "auto"
    presets = Path(__file__).parents[1] / "src/metalm/configs"
    for name in ("gemma-vl", "paper-vl", "paper-lang"):
        assert load_config(presets / f"{name}.yaml").run.mixed_precision == "auto", name


def test_the_accelerator_gets_the_resolved_precision(monkeypatch):
    from metalm.training.config import OptimConfig
    from metalm.training.parallel import setup_parallelism

    _cpu(monkeypatch, native=False, speedup=None)
    monkeypatch.setattr(precision, "_device_type", lambda: "cpu")
    parallel = setup_parallelism(RunConfig(mixed_precision="auto"), OptimConfig())
    assert parallel.mixed_precision == "no" and parallel.accelerator.mixed_precision == "no"


def test_the_timed_check_returns_a_ratio():
    """The real probe (about a second): a positive ratio, cached for the process."""
    REAL_SPEEDUP.cache_clear()
    first = REAL_SPEEDUP()
    assert first > 0 and REAL_SPEEDUP() == first


def test_one_process_may_set_up_runs_of_different_precisions(monkeypatch):
    """A stage in bf16 then the next in fp32 in one process (scripts/interface_results.py trains gemma-vl,
    `auto`, then gemma-vl-icl): accelerate's one-per-process state is renewed for each run."""
    from metalm.training.config import OptimConfig
    from metalm.training.parallel import setup_parallelism

    _cpu(monkeypatch, native=True, speedup=None)
    first = setup_parallelism(RunConfig(mixed_precision="bf16"), OptimConfig()).accelerator.mixed_precision
    second = setup_parallelism(RunConfig(mixed_precision="no"), OptimConfig()).accelerator.mixed_precision
    third = setup_parallelism(RunConfig(mixed_precision="no"), OptimConfig(grad_accum=2)).accelerator
    assert (first, second) == ("bf16", "no") and third.gradient_accumulation_steps == 2


def test_a_report_names_the_cpu_and_its_vector_units():
    xeon = "processor\t: 0\nmodel name\t: Intel Xeon Processor\nflags\t\t: fpu sse avx2 avx512f amx_tile\n"
    epyc = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse avx avx2 fma\n"
    arm = "processor\t: 0\nFeatures\t: fp asimd crc32\n"
    assert precision.describe_cpu(xeon).endswith("cores of Intel Xeon Processor with AVX-512, AMX")
    assert precision.describe_cpu(epyc).endswith("cores of AMD EPYC with AVX2")
    assert precision.describe_cpu(arm).endswith("cores of CPU with NEON")
    assert precision.describe_cpu().split()[0].isdigit()  # this machine: its core count first
