"""The training-config schema: pydantic models with strict validation (the sections ``model``, ``data``,
``optim``, ``run``, ``init_from``; see ``docs/training.md``). Loading YAML into them is
:mod:`metalm.training.config_loading`; everything is imported from :mod:`metalm.training.config`."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationInfo,
    field_validator,
    model_validator,
)

from metalm.data.records import KINDS
from metalm.modalities import encoder_kinds
from metalm.model.connectors import CONNECTOR_TYPES
from metalm.recipe import EncoderRecipe, ModelRecipe
from metalm.schema import FieldProblem
from metalm.training.config_messages import describe as _describe
from metalm.training.config_templates import (
    DEFAULT_PROMPTS,
    DEFAULT_TEMPLATES,
    check_stream_format,
    stream_record_kind,
)
from metalm.training.episodes import InContextSettings

__all__ = [
    "INIT_FROM_FIXED",
    "ConfigError",
    "DataConfig",
    "LoraSettings",
    "ModelConfig",
    "OptimConfig",
    "RunConfig",
    "StreamConfig",
    "TrainConfig",
]

RECORD_KINDS = tuple(KINDS)
SEMI_CAUSAL_KEYS = ("span_min", "span_max", "span_fraction")
# What a saved model (`init_from`) fixes: a config that starts from one cannot set these (`encoders` there
# lists encoders to add, so a base config's are not inherited either).
INIT_FROM_FIXED = ("decoder", "tokenizer", "encoders")


class ConfigError(ValueError):
    """A training config is invalid; the message names the file (or override) and the key path."""


# --------------------------------------------------------------------------------------------
# Value types


def _number_from_text(value: Any) -> Any:
    """YAML 1.1 reads ``1e-4`` (no dot) as a string: accept any string Python reads as a finite number."""
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return value
        return number if math.isfinite(number) else value
    return value


def _no_as_text(value: Any) -> Any:
    """YAML 1.1 reads a bare ``no`` as false: ``mixed_precision: no`` means "no"."""
    return "no" if value is False else value


Float = Annotated[float, BeforeValidator(_number_from_text)]
UnitFloat = Annotated[Float, Field(ge=0, lt=1)]


class _Section(BaseModel):
    """One mapping of a config: unknown keys are errors and values are not coerced (``'3'`` is no int)."""

    model_config = ConfigDict(extra="forbid", strict=True)


# --------------------------------------------------------------------------------------------
# The schema


class LoraSettings(_Section):
    """LoRA adapters on the decoder (``peft``): rank ``r``, scaling ``alpha / r``, dropout on the adapter
    input, and the decoder modules to adapt (default: peft's choice for the decoder's architecture, e.g.
    ``q_proj``/``v_proj`` for Llama). The decoder's own weights stay frozen; the adapters are merged into
    them when the final model is saved."""

    r: int = Field(8, gt=0)
    alpha: Float = Field(16.0, gt=0)
    dropout: UnitFloat = 0.0
    target_modules: list[str] | None = None

    @field_validator("target_modules")
    @classmethod
    def _names_some_module(cls, modules: list[str] | None) -> list[str] | None:
        if modules is not None and not modules:
            raise ValueError("an empty list; name modules or leave it out")
        return modules


def _one_of(names: tuple[str, ...]) -> str:
    """'a', 'a' or 'b', 'a', 'b' or 'c': the allowed values in an error message."""
    quoted = [repr(n) for n in names]
    return quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} or {quoted[-1]}"


class ModelConfig(_Section):
    """What to build (mirrors :class:`metalm.ModelRecipe`). ``decoder``: an HF config dict with
    ``model_type`` (trained from scratch) or a local folder. With ``init_from`` set at the top level,
    leave ``decoder``/``tokenizer`` out; ``encoders`` then lists encoders the saved model lacks, docked
    with fresh connectors (the saved ones are kept as they are); ``semi_causal``, ``decoder_trainable`` and
    ``trainable_layers`` (encoder name → how many top layers train, e.g. ``{text: 2}``) then override the
    saved model's settings. ``decoder_trainable: null`` = True for a new model, the saved value for
    ``init_from``. ``lora``: train LoRA adapters on a frozen decoder (see :class:`LoraSettings`)."""

    decoder: str | dict[str, Any] | None = None
    tokenizer: str | None = None
    encoders: list[EncoderRecipe] | None = None
    semi_causal: dict[str, Any] | None = None
    decoder_trainable: bool | None = None
    trainable_layers: dict[str, Annotated[int, Field(ge=0)]] | None = None
    attn_implementation: str = "sdpa"
    lora: LoraSettings | None = None

    @field_validator("semi_causal")
    @classmethod
    def _known_span_settings(cls, settings: dict[str, Any] | None) -> dict[str, Any] | None:
        for key, value in (settings or {}).items():
            if key not in SEMI_CAUSAL_KEYS:
                raise FieldProblem(f"unknown key; allowed keys here: {', '.join(SEMI_CAUSAL_KEYS)}", key)
            is_number = isinstance(value, int | float) and not isinstance(value, bool)
            if key == "span_fraction" and not (is_number and 0 <= value < 1):
                raise FieldProblem(f"expected a float in [0, 1), got {_describe(value)}", key)
            if key != "span_fraction" and not (isinstance(value, int) and is_number and value >= 1):
                raise FieldProblem(f"expected an int >= 1, got {_describe(value)}", key)
        low, high = (settings or {}).get("span_min"), (settings or {}).get("span_max")
        if low is not None and high is not None and low > high:
            raise ValueError(f"span_min ({low}) > span_max ({high})")
        return settings

    @field_validator("encoders")
    @classmethod
    def _encoders_can_be_built(cls, encoders: list[EncoderRecipe] | None) -> list[EncoderRecipe] | None:
        names: set[str] = set()
        for i, enc in enumerate(encoders or []):
            if not enc.name.isidentifier():
                raise FieldProblem(f"must be an identifier, got {enc.name!r}", i, "name")
            if enc.name in names:
                raise FieldProblem(f"duplicate encoder name {enc.name!r}", i, "name")
            names.add(enc.name)
            if enc.kind not in encoder_kinds():
                raise FieldProblem(f"expected {_one_of(encoder_kinds())}, got {enc.kind!r}", i, "kind")
            if enc.source == "config" and enc.config is None:
                raise FieldProblem("source 'config' needs a config mapping with 'model_type'", i, "config")
            connector = enc.connector if isinstance(enc.connector, str) else enc.connector.get("type")
            if connector not in CONNECTOR_TYPES:
                raise FieldProblem(f"expected {_one_of(CONNECTOR_TYPES)}, got {connector!r}", i, "connector")
            if enc.trainable_layers is not None and enc.trainable_layers < 0:
                raise FieldProblem("must be >= 0 (or null for all layers)", i, "trainable_layers")
            if enc.align_tokens is not None and enc.align_tokens < 1:
                raise FieldProblem("must be >= 1 (or null: no alignment)", i, "align_tokens")
            if enc.transcript_loss is not None and (enc.transcript_loss < 0 or enc.kind != "audio"):
                raise FieldProblem("takes a weight >= 0, on an audio encoder", i, "transcript_loss")
            if enc.image_size <= 0:
                raise FieldProblem(f"must be > 0, got {enc.image_size}", i, "image_size")
        return encoders

    @model_validator(mode="after")
    def _lora_keeps_the_decoder_frozen(self) -> ModelConfig:
        if self.lora is not None and self.decoder_trainable:
            raise FieldProblem(
                "cannot be true with model.lora: LoRA trains adapters on a frozen decoder (set it to false "
                "or leave it out)",
                "decoder_trainable",
            )
        return self

    def check_against_init_from(self, init_from: str | None) -> None:
        """A new model needs its architecture here; a saved one (`init_from`) brings its own."""
        if init_from is None:
            if self.trainable_layers is not None:
                raise FieldProblem(
                    "overrides a saved model's encoders (with init_from); for a new model set "
                    "trainable_layers on each encoder in model.encoders",
                    "trainable_layers",
                )
            if self.decoder is None:
                raise FieldProblem("missing required key (or set init_from to a saved MetaLM)", "decoder")
            if isinstance(self.decoder, dict) and "model_type" not in self.decoder:
                raise FieldProblem("a decoder config needs 'model_type' (e.g. llama, gpt2)", "decoder")
            if isinstance(self.decoder, dict) and self.tokenizer is None:
                raise FieldProblem("a decoder built from a config needs a tokenizer", "tokenizer")
            return
        for key in ("decoder", "tokenizer"):
            if getattr(self, key) is not None:
                raise FieldProblem("cannot be set together with init_from (the saved model's is used)", key)
        # With init_from, `encoders` lists encoders to add to the saved model's (metalm.training.init_from).

    def to_recipe(self) -> ModelRecipe:
        if self.decoder is None:
            raise ConfigError("model.decoder: missing (or set init_from)")
        return ModelRecipe(
            decoder=self.decoder,
            tokenizer=self.tokenizer,
            encoders=[copy.copy(e) for e in self.encoders or []],
            semi_causal=dict(self.semi_causal) if self.semi_causal else None,
            decoder_trainable=True if self.decoder_trainable is None else self.decoder_trainable,
            attn_implementation=self.attn_implementation,
        )


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
    samples of a training micro-batch into as few rows of at most ``seq_len`` positions as they fit in,
    each sample attending only to itself (same losses and gradients, less padding; see docs/training.md)."""

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


class OptimConfig(_Section):
    """AdamW with linear warm-up then linear decay to 0 at ``max_steps`` (optimizer steps).
    ``batch_size`` is per device and per micro-batch: one optimizer step sees
    ``batch_size * grad_accum * world_size`` samples."""

    lr: Float = Field(3e-4, gt=0)
    weight_decay: Float = Field(0.01, ge=0)
    # Not strict: YAML gives a list, the schema keeps a tuple.
    betas: tuple[UnitFloat, UnitFloat] = Field((0.9, 0.95), strict=False)
    eps: Float = Field(1e-8, gt=0)
    warmup_steps: int = Field(0, ge=0)
    max_steps: int = Field(1000, gt=0)
    grad_clip: Annotated[Float, Field(gt=0)] | None = 1.0
    grad_accum: int = Field(1, gt=0)
    batch_size: int = Field(8, gt=0)


class RunConfig(_Section):
    """``eval_every``/``save_every``/``log_every`` in optimizer steps (0: never, except that validation
    and the final model always happen at the end). ``resume``: continue from the newest valid checkpoint
    in ``output_dir`` if there is one (an error if there are checkpoints and none verifies); ``false``:
    an error if there are checkpoints; ``restart``: move any checkpoints aside and start from step 0.
    ``fsdp``: shard parameters, gradients and optimizer state over the processes with FSDP2 (needs
    ``torchrun``/``accelerate launch``; an accelerate config with ``distributed_type: FSDP`` turns it on
    too). ``feature_cache``: keep the outputs of the encoders' frozen lower layers (``trainable_layers``)
    per image / span / clip, content-addressed, in memory and on disk (``true``: under
    ``$METALM_CACHE/features``; a path: there); it changes no result (see docs/training.md).
    ``mixed_precision``: ``auto`` (bf16 autocast where it is faster, else fp32: see
    :mod:`metalm.training.precision`), ``bf16`` or ``no``."""

    output_dir: str = Field("runs/metalm", min_length=1)
    seed: int = 0
    eval_every: int = Field(0, ge=0)
    eval_batches: int = Field(8, ge=0)
    save_every: int = Field(0, ge=0)
    keep_checkpoints: int = Field(2, gt=0)
    log_every: int = Field(10, ge=0)
    mixed_precision: Annotated[Literal["auto", "no", "bf16"], BeforeValidator(_no_as_text)] = "auto"
    resume: bool | Literal["restart"] = True
    tensorboard: bool = True
    fsdp: bool = False
    feature_cache: bool | Annotated[str, Field(min_length=1)] = False


class TrainConfig(_Section):
    """A whole training run. `init_from` is checked when training starts: a preset may name a model that
    an earlier run produces."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig
    optim: OptimConfig = Field(default_factory=OptimConfig)
    run: RunConfig = Field(default_factory=RunConfig)
    init_from: str | None = None
    # Where the config came from (not a YAML key): used in messages only.
    _source: str | None = PrivateAttr(default=None)

    @property
    def source(self) -> str | None:
        return self._source

    @model_validator(mode="after")
    def _model_fits_init_from(self) -> TrainConfig:
        try:
            self.model.check_against_init_from(self.init_from)
        except FieldProblem as problem:
            raise FieldProblem(str(problem), "model", *problem.at) from None
        return self
