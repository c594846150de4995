"""Demonstrations from a file (``metalm generate / chat / serve --demos FILE``): solved examples read from a
file of records and shown before a request (generate) or before every request (chat, serve: the engine's
:class:`DemonstrationPool`), so that a model answers a task in context with no training.

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
import dataclasses
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from metalm.data.processor import InputError
from metalm.data.record_kinds import ImageText, VQAExample
from metalm.data.record_parsing import RecordError
from metalm.data.records import read_records
from metalm.serving.request_types import Demonstration

__all__ = [
    "CHOICES",
    "DemonstrationPool",
    "add_demonstration_args",
    "attach_demonstrations",
    "choose_demonstrations",
    "demonstrations_from_args",
    "read_demonstrations",
]

CHOICES = ("first", "random", "similar")
# A pool's images are read once and kept at the size the vision encoder reads (64 x 64 x 3 bytes for the
# quickstart, 224 x 224 x 3 for a CLIP-sized tower); past this many bytes the rest are read per request.
POOL_IMAGE_BYTES = 512 << 20


def add_demonstration_args(parser: argparse.ArgumentParser, before: str = "the request") -> None:
    parser.add_argument(
        "--demos", metavar="FILE", default=None,
        help=f"solved examples to show before {before}: a JSONL file (or folder) of vqa or image_text "
        "records, each laid out as the model was trained and closed by EOS (in-context learning)",
    )  # fmt: skip
    parser.add_argument("--shots", type=int, default=None, help="how many of --demos to show (default: all)")
    parser.add_argument(
        "--choose", choices=CHOICES, default="first",
        help="which --shots of --demos: the first in the file (default), a random draw (--seed), or those "
        "most similar to the request under the model's encoders",
    )  # fmt: skip


def demonstrations_from_args(args: argparse.Namespace) -> list[Demonstration]:
    """The demonstrations ``--demos`` names (none without it; ``--shots`` / ``--choose`` alone are an error)."""
    if args.demos is None:
        if args.shots is not None or args.choose != "first":
            raise InputError("--shots and --choose pick among --demos FILE; give it")
        return []
    return read_demonstrations(args.demos)


def attach_demonstrations(
    engine: Any, demos: Sequence[Demonstration], shots: int | None, how: str, *, encode: bool | None = None,
    limit: int | None = None,
) -> DemonstrationPool:  # fmt: skip
    """Show ``shots`` of ``demos`` before every chat request of ``engine`` (`metalm chat` / `serve --demos`),
    refused now if the longest of them leave no room within ``limit`` positions."""
    pool = DemonstrationPool(demos, shots, how, engine=engine, encode=encode)
    pool.check_fits(limit)
    engine.demonstrations = pool
    return pool


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


class DemonstrationPool:
    """``shots`` of ``demos`` (all when None) to show before a request, chosen ``how`` (module docstring).
    With ``similar`` the pool is read through ``engine``'s encoders once, here, and each request once, when
    it is asked (under the model lock, so that a server's generation never runs beside it). The chosen
    demonstrations come least similar first."""

    def __init__(
        self, demos: Sequence[Demonstration], shots: int | None, how: str, *, engine: Any = None,
        encode: bool | None = None,
    ) -> None:  # fmt: skip
        if how not in CHOICES:
            raise InputError(f"--choose must be one of {', '.join(CHOICES)}, got {how!r}")
        self.shots = len(demos) if shots is None else shots
        if not 0 <= self.shots <= len(demos):
            raise InputError(
                f"--shots {self.shots}: give 0 to {len(demos)}, the examples the demonstrations file holds"
            )
        if how == "similar" and engine is None:
            raise ValueError("choosing similar demonstrations needs the engine")
        self.demos, self.how, self.engine, self.encode = list(demos), how, engine, encode
        if engine is not None:
            self.demos = _images_held(self.demos, engine.prompts)
        self._vectors = None
        if how == "similar":
            asked = [engine.prompts.request_parts(question=d.question, images=d.images, encode=encode) for d in self.demos]  # fmt: skip
            self._vectors = self._read(
                asked, progress=len(demos) > 256
            )  # a bar (stderr) when it takes a while

    def check_fits(self, limit: int | None) -> None:
        """An error now, at start-up, when the ``shots`` longest demonstrations leave a request no room
        within ``limit`` positions (the model's context, or a server's prompt limit)."""
        if limit is None or not self.shots:
            return
        prompts = self.engine.prompts
        sizes = sorted(
            prompts.prepare(prompts.demonstration_parts([d], encode=self.encode)).num_tokens
            - 1  # less its BOS
            for d in (self.demos[: self.shots] if self.how == "first" else self.demos)
        )
        longest = 1 + sum(sizes[-self.shots :])
        if longest >= limit:
            raise InputError(
                f"{self.shots} demonstrations may take {longest} positions, and a request may have {limit}: "
                "show fewer (--shots)"
            )

    def _read(self, parts: list[list[Any]], progress: bool = False) -> Any:
        from contextlib import nullcontext

        from metalm.evaluation.retrieval import example_vectors

        engine = self.engine
        with getattr(engine.runner, "model_lock", nullcontext()):
            return example_vectors(
                engine.model, engine.processor, [[p for p in ps if p is not None] for ps in parts],
                lambda ps: ps, desc="--demos", progress=progress,
            )  # fmt: skip

    def choose(self, request: list[Any] | None = None, seed: int | None = None) -> list[Demonstration]:
        """The demonstrations for one request (its parts, which ``similar`` compares; None EOS marks are
        skipped); ``random`` draws with ``seed`` (None: a fresh draw)."""
        if self.how == "first":
            return self.demos[: self.shots]
        if self.how == "random":
            return random.Random(seed).sample(self.demos, self.shots)
        if request is None:
            raise ValueError("choosing similar demonstrations needs the request")
        similarity = (self._vectors @ self._read([request])[0]).tolist()
        nearest = sorted(range(len(self.demos)), key=lambda i: (similarity[i], -i), reverse=True)[
            : self.shots
        ]
        return [self.demos[i] for i in reversed(nearest)]  # the most similar last, next to the request


def _images_held(demos: list[Demonstration], prompts: Any) -> list[Demonstration]:
    """`demos` with their images read now and kept cropped and resized as the vision encoder reads them
    (``PromptBuilder.fitted_image``: a prompt prepares them exactly as from their files), up to
    ``POOL_IMAGE_BYTES``: a server shows its pool before every request without reading its files again."""
    held, out = 0, []
    for i, demo in enumerate(demos):
        if demo.images and held < POOL_IMAGE_BYTES:
            try:
                images = [prompts.fitted_image(image) for image in demo.images]
            except InputError as err:
                raise InputError(f"demonstration {i}: {err}") from err
            held += sum(image.width * image.height * len(image.getbands()) for image in images)
            demo = dataclasses.replace(demo, images=images)
        out.append(demo)
    return out


def choose_demonstrations(
    demos: Sequence[Demonstration],
    shots: int | None,
    how: str,
    *,
    engine: Any = None,
    request: dict[str, Any] | None = None,
    seed: int | None = None,
) -> list[Demonstration]:
    """One request's demonstrations (:class:`DemonstrationPool`): ``request`` holds
    `PromptBuilder.request_parts` keyword arguments, compared without their decoder ``text`` cue."""
    encode = (request or {}).get("encode")
    pool = DemonstrationPool(demos, shots, how, engine=engine, encode=encode)
    if how != "similar":
        return pool.choose(seed=seed)
    if request is None:
        raise ValueError("choosing similar demonstrations needs the request")
    return pool.choose(engine.prompts.request_parts(**{**request, "text": None}), seed)
