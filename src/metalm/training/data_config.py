"""The ``data`` section of a training config: its streams (:class:`StreamConfig`) and how they mix
(:class:`DataConfig`); re-exported by :mod:`metalm.training.config_schema`."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, NonNegativeInt, PositiveInt, ValidationInfo, field_validator, model_validator

from metalm.data.records import KINDS
from metalm.schema import FieldProblem
from metalm.training.config_base import Float, _Section
from metalm.training.config_templates import (
    DEFAULT_PROMPTS,
    DEFAULT_TEMPLATES,
    check_stream_format,
    stream_record_kind,
)
from metalm.training.episodes import BALANCED_KINDS, InContextSettings

__all__ = ["DataConfig", "StreamConfig"]

RECORD_KINDS = tuple(KINDS)


class StreamConfig(_Section):
    """One data stream. ``source``: a built-in dataset name (``metalm.data.builtin``) or a JSONL file /
    folder of JSONL files. ``split`` applies to built-ins. ``kind`` picks another record kind of a
    built-in source (``bbc_news`` + ``kind: text``) or, for files, requires every record to be of it.
    Validation records: ``validation_source`` if set, or a ``validation_fraction`` held out of ``source``
    (seeded by ``validation_seed``), else (built-ins) the ``validation_split`` of the same dataset; a file
    stream without either adds nothing to validation.

    ``format``: ``lm`` (semi-causal LM samples, see ``docs/training.md``) or ``instruction`` (supervised,
    FLAN style: classification, VQA and image-text records become ``[BOS] [image] Enc(template) prompt
    label [EOS]`` with only the label and EOS trained) or ``in_context`` (several instruction samples of the
    stream in one window, attending across each other, every answer trained: the layout of k-shot
    evaluation; ``in_context`` settings in :class:`~metalm.training.episodes.InContextSettings`). ``template``: the encoder input, with ``{text}`` and
    ``{options}`` (classification), ``{question}`` (VQA) or no placeholder (image-text); a list = one drawn
    at random per sample. ``prompt``: decoder text between the input and the label (VQA: ``answer:``).
    ``options``: the labels written into ``{options}`` (default: the sorted labels of the training
    records). VQA records are always instruction samples, so ``template``/``prompt`` apply to them in
    either format. ``encode_input: false``: the rendered template as plain, untrained decoder tokens instead
    of through the text encoder (the layout a transcript-trained speech encoder's slots resemble).
    ``typed_twin: W`` (spoken VQA records): W times how far the decoder's states where a spoken question is
    answered are from those the same model computes, without gradient, for its typed twin (docs/training.md).
    ``batch_size`` (``data.mix: batch``): this stream's rows per training micro-batch and process, instead of
    ``optim.batch_size``. A row of several examples (``in_context``) or a long text window costs several
    short rows: fewer of them keep its steps from dominating the run.
    ``balance: answers``: the training records are read so that every answer of a question is equally
    likely (VQA: the records of one question text; classification and image-text: the whole stream, so
    each label or caption alike), the question's share of the stream unchanged: the question alone then
    tells nothing, as VQA v2 paired each question with images of other answers for. An epoch is as many
    draws, with replacement, as the stream has records (an in-context row's demonstrations too); validation
    reads them as they are.
    ``steps: [start, end]``: the optimizer steps ``start <= step < end`` in which the stream is drawn (a
    curriculum: a stream that finishes a run, or one that stops; ``end`` null: to the end of the run);
    outside them its weight is 0. Validation reads every stream.

    A **sharded** source (:mod:`metalm.data.shards`: a pattern such as ``data/cc3m/{00000..00331}.tar``,
    ``.tar``/``.parquet`` files or a folder of them; JSONL files and HF dataset folders with ``streaming:
    true``) is read as it streams, each process its own shards (:mod:`metalm.training.streaming`).
    ``fields`` maps record fields to its columns (``{image: jpg, text: txt}``; left out: the usual names);
    ``kind`` says what its rows are (default for ``.tar`` shards: ``image_text``); ``shuffle_buffer``: the
    records per seeded shuffle block. Its validation records come from ``validation_source`` only.

    A stream is checked on its own here; whether its files exist is checked by :class:`DataConfig`, so a
    stream can be described in code before its file is written."""

    source: str
    name: str | None = None
    split: str = "train"
    weight: Float = Field(1.0, gt=0)
    kind: str | None = None
    validation_split: str | None = "validation"
    validation_source: str | None = None
    # Held out of `source` instead: a seeded fraction, no image in both parts (metalm.training.holdout).
    validation_fraction: Float | None = Field(None, gt=0, lt=1)
    validation_seed: int = 0
    format: Literal["lm", "instruction", "in_context"] = "lm"
    in_context: InContextSettings | None = None
    template: str | list[str] | None = None
    encode_input: bool = True
    typed_twin: Float | None = Field(None, ge=0)
    prompt: str | None = None
    options: list[str] | None = None
    streaming: bool | None = None
    fields: dict[str, str] | None = None
    shuffle_buffer: int = Field(1000, gt=0)
    batch_size: int | None = Field(None, gt=0)
    balance: Literal["answers"] | None = None
    steps: tuple[NonNegativeInt, PositiveInt | None] | None = Field(None, strict=False)

    @property
    def sharded(self) -> bool:
        """Read as it streams, each process its own shards (see the class docstring)."""
        from metalm.data.shards import is_sharded_source

        return self.source not in _builtin_names() and is_sharded_source(self.source, self.streaming)

    @property
    def shard_kind(self) -> str:
        """The record kind of a sharded stream's rows."""
        kind = stream_record_kind(self)
        if kind is not None:
            return kind
        raise ValueError(
            f"stream {self.name!r} ({self.source}): say which kind of records its rows are (kind: ...)"
        )

    @model_validator(mode="after")
    def _sharded_settings(self) -> StreamConfig:
        if not self.sharded:
            for key in ("fields",):
                if getattr(self, key) is not None:
                    raise FieldProblem(
                        "applies to sharded sources (shard patterns, .tar/.parquet files)", key
                    )
            return self
        if self.validation_fraction is not None:
            raise FieldProblem(
                "a sharded source holds nothing out; name held-out shards in validation_source",
                "validation_fraction",
            )
        if self.format == "in_context":
            raise FieldProblem(
                "in_context rows draw from all records; a sharded source is read as it streams", "format"
            )
        if self.balance is not None:
            raise FieldProblem(
                "balancing weighs all records; a sharded source is read as it streams", "balance"
            )
        from metalm.data.shards import DEFAULT_COLUMNS, KIND_FIELDS

        for key in self.fields or {}:
            if key not in DEFAULT_COLUMNS:
                raise FieldProblem(
                    f"unknown record field {key!r}; map any of {', '.join(DEFAULT_COLUMNS)}", "fields"
                )
        kind = stream_record_kind(self)
        if kind is not None and kind not in KIND_FIELDS:
            raise FieldProblem(
                f"a sharded source holds {', '.join(KIND_FIELDS)} records, not {kind!r}", "kind"
            )
        return self

    @field_validator("steps")
    @classmethod
    def _ordered_steps(cls, steps: tuple[int, int | None] | None) -> tuple[int, int | None] | None:
        if steps is not None and steps[1] is not None and steps[0] >= steps[1]:
            raise ValueError(
                f"expected [start, end] with start < end (steps start <= step < end), got {list(steps)}"
            )
        return steps

    @model_validator(mode="after")
    def _one_validation_source(self) -> StreamConfig:
        if self.validation_fraction is not None and self.validation_source is not None:
            raise FieldProblem(
                "give validation_source or validation_fraction, not both", "validation_fraction"
            )
        return self

    @field_validator("kind")
    @classmethod
    def _known_record_kind(cls, kind: str | None) -> str | None:
        if kind is not None and kind not in RECORD_KINDS:
            raise ValueError(f"expected one of {', '.join(RECORD_KINDS)}, got {kind!r}")
        return kind

    @field_validator("split", "validation_split")
    @classmethod
    def _known_split(cls, split: str | None) -> str | None:
        from metalm.data.builtin import SPLITS

        if split is not None and split not in SPLITS:
            raise ValueError(f"expected one of {', '.join(SPLITS)}, got {split!r}")
        return split

    @model_validator(mode="after")
    def _named_and_consistent(self) -> StreamConfig:
        from metalm.data.builtin import BUILTIN_DATASETS

        if self.name is None and any(ch in self.source for ch in "*?[{"):  # a pattern: its folder's name
            self.name = Path(self.source).parent.name or Path(self.source).stem
        if self.name is None:
            self.name = self.source if self.source in BUILTIN_DATASETS else Path(self.source).stem
        check_stream_format(self, stream_record_kind(self))
        if self.balance is not None and stream_record_kind(self) not in (None, *BALANCED_KINDS):
            raise FieldProblem(
                f"balances the answers of {', '.join(BALANCED_KINDS)} records, not of "
                f"{stream_record_kind(self)} records",
                "balance",
            )
        if self.format == "in_context" and self.in_context is None:
            self.in_context = InContextSettings()
        elif self.format != "in_context" and self.in_context is not None:
            raise FieldProblem("applies to format: in_context", "in_context")
        return self

    @property
    def supervised(self) -> bool:
        """Records become instruction samples (formats ``instruction`` and ``in_context``)."""
        return self.format in ("instruction", "in_context")

    def templates(self, kind: str) -> list[str]:
        """The templates for records of `kind` (the configured ones, else the default)."""
        if self.template is None:
            return [DEFAULT_TEMPLATES[kind]]
        return [self.template] if isinstance(self.template, str) else list(self.template)

    def decoder_prompt(self, kind: str) -> str:
        """The decoder prompt for records of `kind` ("" for none)."""
        return self.prompt if self.prompt is not None else DEFAULT_PROMPTS.get(kind, "")


def _builtin_names() -> dict[str, Any]:
    from metalm.data.builtin import BUILTIN_DATASETS

    return BUILTIN_DATASETS


class DataConfig(_Section):
    """``seq_len``: decoder positions per sample (text windows are exactly this long; longer samples are
    truncated, see docs). ``mix``: draw the stream per ``sample`` (rows of one batch mix streams) or per
    ``batch`` (each batch from one stream: much less padding when streams differ in length).
    ``num_workers``: DataLoader worker processes that build the training batches (0: the training
    process builds them between steps); the batches are the same for any number. ``pack``: put the
    samples of a training micro-batch into as few rows of at most ``seq_len`` positions (or an in-context
    stream's own ``in_context.seq_len``) as they fit in, each sample attending only to itself (same losses
    and gradients, less padding; see docs/training.md)."""

    streams: list[StreamConfig]
    seq_len: int = Field(512, ge=8)
    skip_bad: bool = False
    check_images: bool = False
    mix: Literal["sample", "batch"] = "sample"
    max_records: int | None = Field(None, gt=0)
    image_cache_mb: int = Field(1024, ge=0)
    num_workers: int = Field(0, ge=0)
    pack: bool = False

    @field_validator("streams")
    @classmethod
    def _distinct_streams_that_exist(
        cls, streams: list[StreamConfig], info: ValidationInfo
    ) -> list[StreamConfig]:
        from metalm.data.builtin import BUILTIN_DATASETS
        from metalm.training.paths import relative_path_hint

        if not streams:
            raise ValueError("needs at least one stream")
        seen: set[str | None] = set()
        for i, stream in enumerate(streams):
            if stream.name in seen:
                raise FieldProblem(
                    f"duplicate stream name {stream.name!r}; give each stream a name", i, "name"
                )
            seen.add(stream.name)
            for key in ("source", "validation_source"):
                src = getattr(stream, key)
                if src is not None and stream.sharded:
                    from metalm.data.shards import expand_source

                    try:
                        expand_source(src)
                    except (FileNotFoundError, ValueError) as err:
                        raise FieldProblem(
                            str(err) + relative_path_hint(src, (info.context or {}).get("source")), i, key
                        ) from None
                    if stream_record_kind(stream) is None:
                        raise FieldProblem("say which kind of records the shards' rows are", i, "kind")
                    continue
                if src is not None and src not in BUILTIN_DATASETS and not Path(src).exists():
                    raise FieldProblem(
                        f"{src!r} is neither a built-in dataset ({', '.join(BUILTIN_DATASETS)}) "
                        "nor an existing JSONL file or folder"
                        + relative_path_hint(src, (info.context or {}).get("source")),
                        i,
                        key,
                    )
        return streams

    @model_validator(mode="after")
    def _stream_batches_need_batch_mix(self) -> DataConfig:
        for i, stream in enumerate(self.streams):
            if stream.batch_size is not None and self.mix != "batch":
                raise FieldProblem(
                    "a stream's own batch_size needs data.mix: batch (each micro-batch from one stream)",
                    "streams", i, "batch_size",
                )  # fmt: skip
        return self

    def stream_steps(self) -> list[tuple[int, int | None] | None]:
        """Each stream's ``steps`` window, in stream order (None: every step)."""
        return [s.steps for s in self.streams]

    def stream_batch_sizes(self) -> dict[str, int]:
        """The streams with a ``batch_size`` of their own, by name."""
        return {s.name: s.batch_size for s in self.streams if s.batch_size is not None}
