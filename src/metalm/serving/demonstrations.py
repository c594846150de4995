"""Demonstrations for one request (``metalm generate --demos FILE``): solved examples read from a file of
records and shown before the request, so that a model answers a task in context with no training.

A file of ``vqa`` records (an image, a question, answers: the first is shown) or ``image_text`` records
(an image and its caption) in the project's JSONL format (docs/data.md) gives the pool; a bad line is an
error naming the file, the line and the field. ``--shots K`` shows K of them, chosen by ``--choose``:

- ``first``: the first K in the file (a list written for the purpose);
- ``random``: K drawn with ``--seed`` (GPT-3's protocol, ``metalm eval``'s default);
- ``similar``: the K most like the request under the model's own encoders, the most similar next to it
  (:mod:`metalm.evaluation.retrieval`, ``metalm eval --demos similar``).

Each is laid out as a request of its own, followed by its answer and EOS (:meth:`PromptBuilder.request_parts
<metalm.serving.prompts.PromptBuilder.request_parts>`): the prompt ``metalm eval --shots K`` sends.
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from metalm.data.processor import InputError
from metalm.data.record_kinds import ImageText, VQAExample
from metalm.data.record_parsing import RecordError
from metalm.data.records import read_records
from metalm.serving.request_types import Demonstration

__all__ = ["CHOICES", "add_demonstration_args", "choose_demonstrations", "read_demonstrations"]

CHOICES = ("first", "random", "similar")


def add_demonstration_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--demos", metavar="FILE", default=None,
        help="solved examples to show before the request: a JSONL file (or folder) of vqa or image_text "
        "records, each laid out as the model was trained and closed by EOS (in-context learning)",
    )  # fmt: skip
    parser.add_argument("--shots", type=int, default=None, help="how many of --demos to show (default: all)")
    parser.add_argument(
        "--choose", choices=CHOICES, default="first",
        help="which --shots of --demos: the first in the file (default), a random draw (--seed), or those "
        "most similar to the request under the model's encoders",
    )  # fmt: skip


def read_demonstrations(path: str | Path) -> list[Demonstration]:
    """The demonstrations of a file (or folder) of records; a record of another kind, a spoken question, or
    a malformed line is an error naming the file and line."""
    origins: list[tuple[str, int | None]] = []
    try:
        records = list(read_records(path, check_images=True, origins=origins))
    except RecordError as err:  # its own hint names --skip-bad, which a demonstrations file does not take
        where = f"{err.path}:{err.line}: " if err.line is not None else f"{err.path}: "
        field = f"field '{err.field}': " if err.field else ""
        raise InputError(
            f"{where}{field}{err.reason} (every demonstration must be a well-formed record)"
        ) from err
    demos = []
    for record, (file, line) in zip(records, origins, strict=True):
        where = file if line is None else f"{file}:{line}"
        if isinstance(record, VQAExample) and record.audio is None:
            demos.append(Demonstration(record.answers[0], record.question, [record.image]))
        elif isinstance(record, ImageText):
            demos.append(Demonstration(record.text, None, [record.image]))
        else:
            kind = "vqa (spoken question)" if isinstance(record, VQAExample) else record.kind
            raise InputError(f"{where}: a {kind} record cannot be a demonstration here (vqa or image_text)")
    if not demos:
        raise InputError(f"{path}: no records to show as demonstrations")
    return demos


def choose_demonstrations(
    demos: Sequence[Demonstration],
    shots: int | None,
    how: str,
    *,
    engine: Any = None,
    request: dict[str, Any] | None = None,
    seed: int | None = None,
) -> list[Demonstration]:
    """``shots`` of ``demos`` (all when None), chosen ``how`` (module docstring). ``similar`` compares the
    ``request`` (`PromptBuilder.request_parts` keyword arguments) with each demonstration's own request
    under ``engine``'s model; the chosen ones come least similar first."""
    if how not in CHOICES:
        raise InputError(f"--choose must be one of {', '.join(CHOICES)}, got {how!r}")
    shots = len(demos) if shots is None else shots
    if not 0 <= shots <= len(demos):
        raise InputError(
            f"--shots {shots}: give 0 to {len(demos)}, the examples the demonstrations file holds"
        )
    if how == "first":
        return list(demos[:shots])
    if how == "random":
        return random.Random(seed).sample(list(demos), shots)
    if engine is None or request is None:
        raise ValueError("choosing similar demonstrations needs the engine and the request")
    return _most_similar(demos, shots, engine, request)


def _most_similar(
    demos: Sequence[Demonstration], shots: int, engine: Any, request: dict[str, Any]
) -> list[Demonstration]:
    from metalm.evaluation.retrieval import example_vectors

    prompts = engine.prompts
    asked = [
        prompts.request_parts(question=d.question, images=d.images, encode=request.get("encode"))
        for d in demos
    ]
    query = prompts.request_parts(**{**request, "text": None})  # what is asked, not a decoder cue
    vectors = example_vectors(
        engine.model, engine.processor, [*asked, query], lambda parts: parts,
        desc="--demos", progress=len(demos) > 256,  # a bar (on stderr) where reading them takes a while
    )  # fmt: skip
    similarity = (vectors[:-1] @ vectors[-1]).tolist()
    nearest = sorted(range(len(demos)), key=lambda i: (similarity[i], -i), reverse=True)[:shots]
    return [demos[i] for i in reversed(nearest)]  # the most similar last, next to the request
