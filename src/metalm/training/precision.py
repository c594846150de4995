"""``run.mixed_precision: auto``: bf16 autocast where it is faster, fp32 elsewhere.

On a GPU with bf16 (CUDA, XPU) bf16 autocast is the fast path. On a CPU it depends on the chip: with native
bf16 instructions (x86 ``avx512_bf16`` / ``amx_bf16``, Arm ``bf16``) it can be faster, without them torch
emulates it and a step can be ~100x slower (a Gemma-docked step on an AVX2-only EPYC: 587 s against 6 s in
fp32). So on a CPU ``auto`` picks bf16 only when the CPU reports native bf16 *and* a timed check (one small
MLP forward + backward under autocast, against fp32; measured once per process and cached) finds it at least
:data:`MIN_CPU_SPEEDUP` times faster. An explicit ``bf16`` is kept, with a warning that gives the measured
cost when the CPU has no native bf16.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from pathlib import Path

import torch

__all__ = [
    "MIN_CPU_SPEEDUP",
    "cpu_bf16_speedup",
    "cpu_has_native_bf16",
    "describe_cpu",
    "native_bf16_in_cpuinfo",
    "resolve_mixed_precision",
]

logger = logging.getLogger(__name__)

# bf16 must win clearly on the probe: a real step adds casts and non-matmul work the probe barely has.
MIN_CPU_SPEEDUP = 1.2
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})  # x86 flags; Arm's "Features: ... bf16"


def _cpuinfo() -> str | None:
    """This machine's /proc/cpuinfo text; None where there is none (not Linux)."""
    try:
        return Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None


def _first_cpu(text: str) -> tuple[dict[str, str], set[str] | None]:
    """The first processor's fields of a /proc/cpuinfo text (lower-case keys) and its ``flags`` (x86) /
    ``Features`` (Arm), None when it lists neither."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip().lower(), value.strip())
    flags = fields.get("flags", fields.get("features"))
    return fields, None if flags is None else set(flags.split())


@functools.cache
def cpu_has_native_bf16() -> bool | None:
    """Whether /proc/cpuinfo lists a native bf16 flag; None where there is no /proc/cpuinfo (not Linux)."""
    text = _cpuinfo()
    return None if text is None else native_bf16_in_cpuinfo(text)


def native_bf16_in_cpuinfo(text: str) -> bool | None:
    """Whether the first ``flags`` (x86) / ``Features`` (Arm) line of a /proc/cpuinfo text names native bf16."""
    flags = _first_cpu(text)[1]
    return None if flags is None else bool(NATIVE_BF16_FLAGS & flags)


def describe_cpu(cpuinfo: str | None = None) -> str:
    """The cores this process may use and what they are, for a report's timings: "2 cores of AMD EPYC
    with AVX2", "... with AVX-512, AMX" (no brackets: reports put it in brackets). A CPU's vector units set a CPU run's speed (the quickstart takes about
    twice as long with AVX2 alone as with AVX-512). `cpuinfo`: a /proc/cpuinfo text (default: this one's)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cpuinfo = _cpuinfo() if cpuinfo is None else cpuinfo
    if cpuinfo is None:
        return f"{cores} CPU cores"
    fields, flags = _first_cpu(cpuinfo)
    flags = flags or set()
    units = [name for name, flag in (("AVX-512", "avx512f"), ("AMX", "amx_tile")) if flag in flags]
    units = units or [name for name, flag in (("AVX2", "avx2"), ("NEON", "asimd")) if flag in flags]
    model = fields.get("model name") or fields.get("cpu model") or "CPU"
    return f"{cores} cores of {model}" + (f" with {', '.join(units)}" if units else "")


def _probe_step(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, bf16: bool) -> float:
    """Seconds for one MLP forward + backward, under bf16 autocast when `bf16`."""
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = torch.nn.functional.gelu(x @ w1).matmul(w2).float().square().mean()
    loss.backward()
    return time.perf_counter() - start


@functools.cache
def cpu_bf16_speedup(rounds: int = 3) -> float:
    """fp32 time / bf16-autocast time of a small MLP step on this CPU (above 1: bf16 is faster), best of
    `rounds` each, interleaved so that load from other processes hits both alike. About a second; once per
    process."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 512, generator=gen)
    w1 = torch.randn(512, 2048, generator=gen, requires_grad=True)
    w2 = torch.randn(2048, 512, generator=gen, requires_grad=True)
    _probe_step(x, w1, w2, False), _probe_step(x, w1, w2, True)  # warm-up: kernel choice, allocations
    fp32 = bf16 = float("inf")
    for _ in range(rounds):
        fp32 = min(fp32, _probe_step(x, w1, w2, False))
        bf16 = min(bf16, _probe_step(x, w1, w2, True))
    return fp32 / bf16


def _device_type() -> str:
    if torch.cuda.is_available():
        return "cuda"
    xpu = getattr(torch, "xpu", None)
    if xpu is not None and xpu.is_available():
        return "xpu"
    mps = getattr(torch.backends, "mps", None)
    return "mps" if mps is not None and mps.is_available() else "cpu"


def _auto(device: str) -> tuple[str, str]:
    """(choice, why) for `auto` on `device`."""
    if device == "cuda":
        ok = torch.cuda.is_bf16_supported()
        return ("bf16", "CUDA with bf16") if ok else ("no", "this CUDA device has no bf16")
    if device == "xpu":
        return "bf16", "XPU"
    if device != "cpu":
        return "no", f"{device}: fp32"
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # A timing can come out differently in each process; every process must autocast alike.
        return "no", "several CPU processes (set bf16 explicitly to use it)"
    native = cpu_has_native_bf16()
    if native is False:
        return "no", "the CPU has no native bf16 (avx512_bf16/amx_bf16)"
    speedup = cpu_bf16_speedup()
    if speedup >= MIN_CPU_SPEEDUP:
        return "bf16", f"bf16 autocast {speedup:.2f}x faster than fp32 in a timed check on this CPU"
    return "no", f"bf16 autocast {speedup:.2f}x the speed of fp32 in a timed check on this CPU"


def resolve_mixed_precision(requested: str, device: str | None = None) -> str:
    """The mixed precision accelerate is given for `requested` (``auto``, ``bf16`` or ``no``): ``auto``
    becomes ``bf16`` or ``no`` (logged); an explicit ``bf16`` on a CPU without native bf16 is kept, with a
    warning that says how much slower it measured."""
    device = device or _device_type()
    if requested == "auto":
        choice, why = _auto(device)
        logger.info("mixed precision auto -> %s (%s)", "bf16" if choice == "bf16" else "fp32", why)
        return choice
    if requested == "bf16" and device == "cpu" and cpu_has_native_bf16() is False:
        speedup = cpu_bf16_speedup()
        cost = f"{1 / speedup:.1f}x slower than" if speedup < 1 else f"{speedup:.2f}x the speed of"
        logger.warning(
            "run.mixed_precision=bf16 on a CPU without native bf16 (no avx512_bf16/amx_bf16): bf16 autocast ran "
            "%s fp32 in a timed check here; run.mixed_precision=auto (or no) trains in fp32",
            cost,
        )
    return requested
