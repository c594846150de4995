"""``metalm generate``: one request, laid out as the model was trained, optionally after demonstrations."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from typing import Any, TextIO

from metalm.data.processor import InputError
from metalm.modalities.text import Encode
from metalm.serving.cli_common import add_model_args, quiet_loading
from metalm.serving.demonstrations import (
    add_demonstration_args,
    choose_demonstrations,
    demonstrations_from_args,
)
from metalm.serving.engine import Engine
from metalm.serving.request_types import Demonstration, Prompt, SamplingParams

__all__ = ["add_generate_parser", "generate"]


def generate(
    model: str | Engine,
    prompt: str | None = None,
    *,
    question: str | None = None,
    text: str | None = None,
    images: Sequence[str] = (),
    audio: Sequence[str] = (),
    encode: bool | None = None,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    num_beams: int = 1,
    n: int = 1,
    stop: Sequence[str] = (),
    seed: int | None = None,
    device: str = "auto",
    as_json: bool = False,
    output: TextIO | None = None,
    demonstrations: Sequence[Demonstration] = (),
    shots: int | None = None,
    choose: str = "first",
) -> dict[str, Any]:
    """Generate for one request with a saved model folder (or a loaded `Engine`).

    The request is laid out as the model was trained (`metalm.serving.prompts.PromptBuilder.request_parts`):
    ``question`` in its ``vqa`` layout, images alone in its ``caption`` layout, a raw ``prompt`` after the
    images, then decoder ``text``; speech clips (``audio``) are heard right after the images (alone: a
    transcription; with images and no question: a spoken question). Encoded text goes through the text
    encoder when the model has one and it fits (``encode=None``), always (``True``; an error if it does not
    fit) or never (``False``). Greedy by default (``temperature=0``). Prints the answer as it is generated,
    or one JSON object with ``as_json``; returns that object. ``demonstrations``: solved examples shown
    first, ``shots`` of them (all when None) chosen ``first`` / ``random`` (``seed``) / ``similar`` to the
    request (:mod:`metalm.serving.demonstrations`)."""
    output = output or sys.stdout
    engine = model if isinstance(model, Engine) else Engine.from_pretrained(model, device=device)
    params = SamplingParams(
        max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, num_beams=num_beams, n=n,
        stop=list(stop), seed=seed,
    )  # fmt: skip
    request = {"prompt": prompt, "question": question, "text": text, "images": images, "audio": audio}
    request["encode"] = encode
    shown = (
        choose_demonstrations(demonstrations, shots, choose, engine=engine, request=request, seed=seed)
        if demonstrations
        else []
    )
    parts = engine.prompts.request_parts(**request, demonstrations=shown)
    prepared = _prepared(engine, parts, shown)
    start = time.perf_counter()
    job = engine.start_job(prepared, params)
    streaming = not as_json and num_beams == 1 and n == 1
    for event in job.events():
        if streaming and event.text:
            output.write(event.text)
            output.flush()
    result = job.result()
    seconds = time.perf_counter() - start
    if streaming:
        output.write("\n")
    elif not as_json:
        for i, c in enumerate(result.completions):
            print(f"[{i}] {c.text}" if n > 1 else c.text, file=output)
    report = _report(engine, request, shown, parts, prepared, result, seconds)
    if as_json:
        print(json.dumps(report, ensure_ascii=False), file=output)
    return report


def _report(
    engine: Engine, request: dict[str, Any], shown: Sequence[Demonstration], parts: list[Any], prepared: Prompt,
    result: Any, seconds: float,
) -> dict[str, Any]:  # fmt: skip
    """What `generate` returns (and prints with ``as_json``)."""
    return {
        "model": engine.name,
        **{key: request[key] for key in ("prompt", "question", "text")},
        "images": list(request["images"]),
        "audio": list(request["audio"]),
        "demonstrations": [d.answer for d in shown],
        "encoded_prompt": any(isinstance(p, Encode) for p in parts),
        "prompt_tokens": prepared.num_tokens,
        "completions": [
            {"text": c.text, "finish_reason": c.finish_reason, "tokens": len(c.token_ids)}
            for c in result.completions
        ],
        "completion_tokens": result.completion_tokens,
        "seconds": round(seconds, 4),
        "tokens_per_second": round(result.completion_tokens / seconds, 2) if seconds > 0 else None,
    }


def _prepared(engine: Engine, parts: list[Any], shown: Sequence[Demonstration]) -> Prompt:
    """The tokenized prompt; demonstrations that leave no room to answer are an error that says so."""
    prepared = engine.prepare(parts)
    context = engine.context_length
    if shown and context is not None and prepared.num_tokens >= context:
        raise InputError(
            f"the request after {len(shown)} demonstrations takes {prepared.num_tokens} positions, the model's "
            f"whole context ({context}); show fewer (--shots)"
        )
    return prepared


def _generate_from_args(args: argparse.Namespace) -> int:
    quiet_loading()
    try:
        generate(
            args.model, args.prompt, question=args.question, text=args.text, images=args.image or (),
            audio=args.audio or (), encode=args.encode_prompt,
            max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
            num_beams=args.num_beams, n=args.n, stop=args.stop or (), seed=args.seed, device=args.device,
            as_json=args.json, demonstrations=demonstrations_from_args(args),
            shots=args.shots, choose=args.choose,
        )  # fmt: skip
    except (InputError, ValueError, FileNotFoundError) as err:
        print(f"metalm generate: error: {err}", file=sys.stderr)
        return 2
    return 0


def add_generate_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "generate", help="generate text for a question, a prompt or an image",
        description="Generate for one request, laid out as the model was trained: --question uses its VQA "
        "layout ([images] Enc('question: ...') answer:), an image alone its caption layout; --prompt is raw "
        "text read by the text encoder (the paper's zero-shot setting), optionally followed by decoder --text.",
    )  # fmt: skip
    add_model_args(p)
    p.add_argument("--question", default=None, help="a question, in the model's trained VQA layout")
    p.add_argument("--prompt", default=None, help="raw prompt text (read by the text encoder when it fits)")
    p.add_argument("--text", default=None, help="decoder text after the prompt, e.g. 'answer:'")
    p.add_argument("--image", action="append", metavar="PATH", help="an image file (repeatable)")
    p.add_argument(
        "--audio", action="append", metavar="PATH",
        help="a speech clip (WAV/FLAC/OGG/MP3; repeatable): alone it is transcribed, with --image it is the "
        "question",
    )  # fmt: skip
    p.add_argument(
        "--encode-prompt", action=argparse.BooleanOptionalAction, default=None,
        help="read the prompt/question with the text encoder (default: when the model has one and it fits)",
    )  # fmt: skip
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--num-beams", type=int, default=1)
    p.add_argument("-n", type=int, default=1, help="number of answers")
    p.add_argument("--stop", action="append", metavar="TEXT", help="stop at this text (repeatable)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    add_demonstration_args(p)
    p.set_defaults(func=_generate_from_args)
    return p
