"""Command-line front ends: ``metalm generate``, ``metalm chat`` and ``metalm serve``.

Each command is a plain function (usable from Python and tests) plus an ``add_<cmd>_parser(subparsers)``
helper that registers it with argparse; the registered handler is ``args.func(args) -> int`` (exit code).
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any, TextIO

from metalm.data.processor import InputError
from metalm.serving.cli_common import add_chat_history_arg, add_model_args, quiet_loading
from metalm.serving.demonstrations import (
    add_demonstration_args,
    attach_demonstrations,
    demonstrations_from_args,
)
from metalm.serving.engine import Engine
from metalm.serving.generate_command import add_generate_parser, generate
from metalm.serving.request_types import ChatMessage, Demonstration, SamplingParams
from metalm.serving.settings import ServerSettings
from metalm.serving.vllm_process import VLLMSettings, VLLMStartError, add_vllm_args, vllm_settings_from_args

__all__ = [
    "add_chat_parser",
    "add_generate_parser",
    "add_parsers",
    "add_serve_parser",
    "chat",
    "generate",
    "serve",
]

logger = logging.getLogger("metalm.serving")


# --- chat ---------------------------------------------------------------------------------------------
CHAT_HELP = "commands: /image PATH (attach to the next message), /reset, /quit"


def chat(
    model: str | Engine,
    *,
    max_new_tokens: int = 128,
    temperature: float = 0.7,
    top_p: float = 0.9,
    encode: bool | None = None,
    device: str = "auto",
    chat_history: str = "latest",
    input_fn: Callable[[str], str] = input,
    output: TextIO | None = None,
    demonstrations: Sequence[Demonstration] = (),
    shots: int | None = None,
    choose: str = "first",
) -> list[ChatMessage]:
    """A multi-turn chat in the terminal with streamed answers. Returns the conversation at the end.
    ``demonstrations``: ``shots`` of them, chosen ``choose``, before every request
    (:func:`~metalm.serving.demonstrations.attach_demonstrations`)."""
    output = output or sys.stdout
    engine = (
        model
        if isinstance(model, Engine)
        else Engine.from_pretrained(model, device=device, chat_history=chat_history)
    )
    if demonstrations:
        attach_demonstrations(
            engine, demonstrations, shots, choose, encode=encode, limit=engine.context_length
        )
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)
    history: list[ChatMessage] = []
    images: list[Any] = []
    print(f"metalm chat with {engine.name}. {CHAT_HELP}", file=output)
    while True:
        try:
            line = input_fn("you> ")
        except (EOFError, KeyboardInterrupt):
            print(file=output)
            break
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            command, _, arg = line.partition(" ")
            if command in ("/quit", "/exit"):
                break
            if command == "/reset":
                history, images = [], []
                print("(conversation cleared)", file=output)
            elif command == "/image":
                try:
                    images.append(engine.prompts.load_image(arg.strip()))
                    print(f"(image attached: {arg.strip()})", file=output)
                except InputError as err:
                    print(f"error: {err}", file=output)
            else:
                print(CHAT_HELP, file=output)
            continue
        turn = ChatMessage("user", line, images)
        output.write("assistant> ")
        output.flush()
        answer = []
        try:
            for event in engine.stream(engine.chat_parts([*history, turn], encode=encode), params):
                if event.text:
                    answer.append(event.text)
                    output.write(event.text)
                    output.flush()
        except InputError as err:
            print(f"\nerror: {err}", file=output)
            continue
        except KeyboardInterrupt:
            pass  # keep what was generated so far
        output.write("\n")
        history += [turn, ChatMessage("assistant", "".join(answer))]
        images = []
    return history


def _chat_from_args(args: argparse.Namespace) -> int:
    quiet_loading()
    try:
        chat(
            args.model, max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
            encode=args.encode_prompt, device=args.device, chat_history=args.chat_history,
            demonstrations=demonstrations_from_args(args), shots=args.shots, choose=args.choose,
        )  # fmt: skip
    except (InputError, ValueError, FileNotFoundError) as err:
        print(f"metalm chat: error: {err}", file=sys.stderr)
        return 2
    return 0


def add_chat_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "chat", help="multi-turn chat in the terminal", description=f"Chat REPL; {CHAT_HELP}."
    )
    add_model_args(p)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--encode-prompt", action=argparse.BooleanOptionalAction, default=None)
    add_chat_history_arg(p)
    add_demonstration_args(p, "every request")
    p.set_defaults(func=_chat_from_args)
    return p


# --- serve --------------------------------------------------------------------------------------------
def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _warn_exposed(host: str, settings: Any, api_key: str | None, allowed_hosts: Sequence[str]) -> None:
    """Say what a non-loopback bind exposes, and which Host names are answered."""
    logger.warning(
        "binding to %s: the server is reachable from other machines%s", host,
        "" if api_key else " and has no API key (METALM_API_KEY)",
    )  # fmt: skip
    if not allowed_hosts:
        logger.warning(
            "requests are answered only when their Host header is one of %s; add the names clients use "
            "with --allowed-hosts", ", ".join(settings.allowed_hosts),
        )  # fmt: skip


def serve(
    model: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    allow_image_hosts: Sequence[str] = (),
    allow_image_dirs: Sequence[str] = (),
    model_name: str | None = None,
    device: str = "auto",
    dtype: str | None = None,
    max_batch_size: int = 16,
    batch_wait_ms: float = 10.0,
    feature_cache_mb: float = 256,
    batching: str = "continuous",
    chat_history: str = "latest",
    max_concurrent_requests: int = 32,
    max_tokens_limit: int = 1024,
    default_max_tokens: int = 256,
    max_prompt_tokens: int | None = None,
    max_body_bytes: int = 12_000_000,
    max_image_bytes: int = 8_000_000,
    max_image_pixels: int = 16_777_216,
    max_request_pixels: int = 33_554_432,
    max_concurrent_decodes: int = 2,
    max_images: int = 8,
    request_timeout_s: float = 120.0,
    image_fetch_timeout_s: float = 10.0,
    allowed_hosts: Sequence[str] = (),
    allowed_origins: Sequence[str] = (),
    api_key: str | None = None,
    log_level: str = "info",
    vllm: VLLMSettings | None = None,
    demonstrations: Sequence[Demonstration] = (),
    shots: int | None = None,
    choose: str = "first",
) -> None:
    """Serve a saved model over HTTP (OpenAI chat completions API + a chat page at /). Loads the model once;
    with `vllm` settings its decoder runs in vLLM (`metalm.serving.vllm_backend`).

    The server answers to loopback Host names, the bound address and ``allowed_hosts`` ("*": any).
    ``demonstrations``: ``shots`` of them, chosen ``choose``, before every request."""
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    names = [*ServerSettings.allowed_hosts, *allowed_hosts]
    if host not in ("0.0.0.0", "::", ""):  # a wildcard bind has no name of its own
        names.append(host)
    settings = ServerSettings(
        model_name=model_name, max_body_bytes=max_body_bytes, max_image_bytes=max_image_bytes,
        max_image_pixels=max_image_pixels, max_request_pixels=max_request_pixels,
        max_concurrent_decodes=max_concurrent_decodes, max_images=max_images,
        max_prompt_tokens=max_prompt_tokens, max_tokens_limit=max_tokens_limit,
        default_max_tokens=min(default_max_tokens, max_tokens_limit),
        max_concurrent_requests=max_concurrent_requests, request_timeout_s=request_timeout_s,
        image_fetch_timeout_s=image_fetch_timeout_s, allow_image_hosts=tuple(allow_image_hosts),
        allow_image_dirs=tuple(allow_image_dirs), allowed_hosts=tuple(names),
        allowed_origins=tuple(allowed_origins), api_key=api_key,
    )  # fmt: skip
    if not _is_loopback(host):
        _warn_exposed(host, settings, api_key, allowed_hosts)
    engine = Engine.from_pretrained(
        model, device=device, dtype=dtype, name=model_name, max_batch_size=max_batch_size,
        batch_wait_ms=batch_wait_ms, max_pending=max_concurrent_requests, batching=batching,
        chat_history=chat_history, vllm=vllm, feature_cache_mb=feature_cache_mb,
    )  # fmt: skip
    _run_server(
        engine, settings, host=host, port=port, log_level=log_level, demonstrations=demonstrations,
        shots=shots, choose=choose, max_concurrent_requests=max_concurrent_requests,
    )  # fmt: skip


def _run_server(
    engine: Engine,
    settings: ServerSettings,
    *,
    host: str,
    port: int,
    log_level: str,
    demonstrations: Sequence[Demonstration],
    shots: int | None,
    choose: str,
    max_concurrent_requests: int,
) -> None:
    """Attach the demonstrations, build the app and serve it until stopped; the engine is closed after,
    and on any failure before."""
    import uvicorn

    from metalm.serving.server import create_app

    try:
        if demonstrations:
            limit = settings.max_prompt_tokens or engine.context_length
            attach_demonstrations(engine, demonstrations, shots, choose, limit=limit)
        app = create_app(engine, settings)
    except BaseException:
        engine.close()
        raise
    logger.info(
        "serving %s on http://%s:%d (open it in a browser to chat)",
        settings.model_name or engine.name,
        host,
        port,
    )
    try:
        # A backstop on open connections (uvicorn answers 503 beyond it), so that slow or idle clients
        # cannot hold unbounded memory; requests beyond max_concurrent_requests get the API's own 429.
        uvicorn.run(
            app, host=host, port=port, log_level=log_level, timeout_keep_alive=5, server_header=False,
            limit_concurrency=4 * max_concurrent_requests + 16,
        )  # fmt: skip
    finally:
        engine.close()


def _serve_from_args(args: argparse.Namespace) -> int:
    import os

    try:
        serve(
            args.model, args.host, args.port, allow_image_hosts=args.allow_image_hosts or (),
            allow_image_dirs=args.allow_image_dirs or (), model_name=args.model_name, device=args.device,
            dtype=args.dtype, max_batch_size=args.max_batch_size, batch_wait_ms=args.batch_wait_ms,
            feature_cache_mb=args.feature_cache_mb, batching=args.batching, chat_history=args.chat_history,
            max_concurrent_requests=args.max_concurrent_requests, max_tokens_limit=args.max_tokens_limit,
            default_max_tokens=args.default_max_tokens, max_prompt_tokens=args.max_prompt_tokens,
            max_body_bytes=args.max_body_bytes, max_image_bytes=args.max_image_bytes,
            max_image_pixels=args.max_image_pixels, max_request_pixels=args.max_request_pixels,
            max_concurrent_decodes=args.max_concurrent_decodes, max_images=args.max_images,
            request_timeout_s=args.request_timeout, image_fetch_timeout_s=args.image_fetch_timeout,
            allowed_hosts=args.allowed_hosts or (), allowed_origins=args.allowed_origins or (),
            api_key=args.api_key or os.environ.get("METALM_API_KEY") or None,
            log_level=args.log_level, vllm=vllm_settings_from_args(args),
            demonstrations=demonstrations_from_args(args), shots=args.shots, choose=args.choose,
        )  # fmt: skip
    except (ValueError, FileNotFoundError, VLLMStartError) as err:
        print(f"metalm serve: error: {err}", file=sys.stderr)
        return 2
    return 0


def _megabytes(value: str) -> float:
    try:
        megabytes = float(value)
    except ValueError:
        megabytes = -1.0
    if not megabytes >= 0:  # also NaN
        raise argparse.ArgumentTypeError(f"give 0 (off) or a number of megabytes, not {value!r}")
    return megabytes


def add_serve_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "serve", help="serve a model over HTTP (OpenAI-compatible API + chat page)",
        description="OpenAI-compatible chat completions server with continuous batching and a chat page at /. "
        "Set METALM_API_KEY to require 'Authorization: Bearer <key>'.",
    )  # fmt: skip
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--model-name",
        default=None,
        help="model id clients send (default: the folder's name, e.g. quickstart/final)",
    )
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    p.add_argument(
        "--allow-image-hosts", nargs="*", metavar="HOST",
        help="hosts whose http(s) image URLs may be fetched (default: none; data URLs only)",
    )  # fmt: skip
    p.add_argument(
        "--allow-image-dirs", nargs="*", metavar="DIR",
        help="folders whose files file:// image URLs may read (default: none)",
    )  # fmt: skip
    p.add_argument(
        "--image-fetch-timeout", type=float, default=10.0, metavar="SECONDS",
        help="total time to fetch one http(s) image, connect to last byte (default: 10)",
    )  # fmt: skip
    p.add_argument(
        "--allowed-hosts", nargs="*", metavar="NAME",
        help="Host header names to answer besides localhost, 127.0.0.1, ::1 and the --host address "
        "(DNS-rebinding guard; '*' = any)",
    )  # fmt: skip
    p.add_argument(
        "--allowed-origins", nargs="*", metavar="ORIGIN",
        help="browser origins (scheme://host[:port]) besides the server's own that may call the API "
        "('*' = any)",
    )  # fmt: skip
    add_chat_history_arg(p)
    add_demonstration_args(p, "every request")
    add_vllm_args(p)
    limits = p.add_argument_group("limits")
    limits.add_argument("--max-batch-size", type=int, default=16, help="most rows decoded together")
    limits.add_argument(
        "--batching", choices=["continuous", "dynamic"], default="continuous",
        help="continuous: requests join and leave the running batch between decode steps; dynamic: one "
        "generate call per collected batch (also the fallback for decoders whose cache cannot be joined)",
    )  # fmt: skip
    limits.add_argument(
        "--batch-wait-ms", type=float, default=10.0, help="dynamic batching: wait for more requests to batch"
    )
    limits.add_argument(
        "--feature-cache-mb", type=_megabytes, default=256,
        help="memory for the frozen encoder parts' outputs, per image and text span, so that an image asked "
        "about again and the --demos shown before every request are not encoded again (0: off)",
    )  # fmt: skip
    limits.add_argument("--max-concurrent-requests", type=int, default=32, help="in flight; more get 429")
    limits.add_argument("--max-tokens-limit", type=int, default=1024, help="largest max_tokens allowed")
    limits.add_argument("--default-max-tokens", type=int, default=256)
    limits.add_argument("--max-prompt-tokens", type=int, default=None, help="default: the model's context")
    limits.add_argument("--max-body-bytes", type=int, default=12_000_000)
    limits.add_argument("--max-image-bytes", type=int, default=8_000_000)
    limits.add_argument("--max-image-pixels", type=int, default=16_777_216, help="per image, from its header")
    limits.add_argument(
        "--max-request-pixels", type=int, default=33_554_432, help="decoded by all images of a request"
    )
    limits.add_argument("--max-concurrent-decodes", type=int, default=2, help="image decodes at once")
    limits.add_argument("--max-images", type=int, default=8, help="images per request")
    limits.add_argument("--request-timeout", type=float, default=120.0, help="seconds per request")
    p.add_argument(
        "--api-key", default=None, metavar="KEY",
        help="require 'Authorization: Bearer KEY' (default: $METALM_API_KEY; the variable keeps the key out "
        "of the process list)",
    )  # fmt: skip
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=_serve_from_args)
    return p


def add_parsers(subparsers: Any) -> None:
    """Register generate, chat and serve."""
    add_generate_parser(subparsers)
    add_chat_parser(subparsers)
    add_serve_parser(subparsers)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m metalm.serving.cli ...` (the `metalm` entry point registers the same parsers)."""
    parser = argparse.ArgumentParser(prog="metalm")
    add_parsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
