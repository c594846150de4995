"""Training configuration: small dataclasses, loaded from YAML with strict validation.

A config file has the sections ``model``, ``data``, ``optim``, ``run`` and optionally ``init_from`` and
``extends`` (see ``docs/training.md``). :func:`load_config` turns YAML plus ``key=value`` overrides into a
:class:`TrainConfig`; every problem (unknown key, wrong type, bad value, missing file) raises
:class:`ConfigError` whose message names the file (or the override) and the key path, e.g.
``configs/x.yaml: optim.lr: expected float, got 'abc'``.
"""

from __future__ import annotations

import dataclasses
import math
import string
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from metalm.model.builder import EncoderRecipe, ModelRecipe

__all__ = [
    "ConfigError",
    "DataConfig",
    "LoraSettings",
    "ModelConfig",
    "OptimConfig",
    "RunConfig",
    "StreamConfig",
    "TrainConfig",
    "apply_overrides",
    "check_template",
    "config_from_dict",
    "config_to_dict",
    "load_config",
]

RECORD_KINDS = ("text", "image_text", "interleaved", "vqa", "classification")
SEMI_CAUSAL_KEYS = ("span_min", "span_max", "span_fraction")
STREAM_FORMATS = ("lm", "instruction")
# Instruction samples (`format: instruction`; VQA records always): the placeholders a template may use per
# record kind, the one it must use, and the defaults. A classification record's `{options}` is the
# stream's labels joined with OPTIONS_JOINER (FLAN writes the options into the input).
TEMPLATE_FIELDS: dict[str, tuple[str, ...]] = {
    "classification": ("text", "options"),
    "vqa": ("question",),
    "image_text": (),
}
TEMPLATE_REQUIRED = {"classification": "text", "vqa": "question"}
DEFAULT_TEMPLATES = {
    "classification": "{text} OPTIONS: {options} TARGET:",
    "vqa": "question: {question}",
    "image_text": "Summarize this image:",
}
DEFAULT_PROMPTS = {"vqa": "answer:"}
OPTIONS_JOINER = ", "
# What a saved model (`init_from`) fixes: a config that starts from one cannot set these.
INIT_FROM_FIXED = ("decoder", "tokenizer", "encoders")


class ConfigError(ValueError):
    """A training config is invalid; the message names the file (or override) and the key path."""


# --------------------------------------------------------------------------------------------
# The schema


@dataclass
class LoraSettings:
    """LoRA adapters on the decoder (``peft``): rank ``r``, scaling ``alpha / r``, dropout on the adapter
    input, and the decoder modules to adapt (default: peft's choice for the decoder's architecture, e.g.
    ``q_proj``/``v_proj`` for Llama). The decoder's own weights stay frozen; the adapters are merged into
    them when the final model is saved."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] | None = None


@dataclass
class ModelConfig:
    """What to build (mirrors :class:`metalm.ModelRecipe`). ``decoder``: an HF config dict with
    ``model_type`` (trained from scratch) or a local folder. With ``init_from`` set at the top level,
    leave ``decoder``/``tokenizer``/``encoders`` out; ``semi_causal`` and ``decoder_trainable`` then
    override the saved model's settings. ``decoder_trainable: null`` = True for a new model, the saved
    value for ``init_from``. ``lora``: train LoRA adapters on a frozen decoder (see :class:`LoraSettings`)."""

    decoder: str | dict[str, Any] | None = None
    tokenizer: str | None = None
    encoders: list[EncoderRecipe] | None = None
    semi_causal: dict[str, Any] | None = None
    decoder_trainable: bool | None = None
    attn_implementation: str = "sdpa"
    lora: LoraSettings | None = None

    def to_recipe(self) -> ModelRecipe:
        if self.decoder is None:
            raise ConfigError("model.decoder: missing (or set init_from)")
        return ModelRecipe(
            decoder=self.decoder,
            tokenizer=self.tokenizer,
            encoders=[dataclasses.replace(e) for e in self.encoders or []],
            semi_causal=dict(self.semi_causal) if self.semi_causal else None,
            decoder_trainable=True if self.decoder_trainable is None else self.decoder_trainable,
            attn_implementation=self.attn_implementation,
        )


@dataclass
class StreamConfig:
    """One data stream. ``source``: a built-in dataset name (``metalm.data.builtin``) or a JSONL file /
    folder of JSONL files. ``split`` applies to built-ins. ``kind`` picks another record kind of a
    built-in source (``bbc_news`` + ``kind: text``) or, for files, requires every record to be of it.
    Validation records: ``validation_source`` if set, else (built-ins) the ``validation_split`` of the
    same dataset; a file stream without ``validation_source`` adds nothing to validation.

    ``format``: ``lm`` (semi-causal LM samples, see ``docs/training.md``) or ``instruction`` (supervised,
    FLAN style: classification, VQA and image-text records become ``[BOS] [image] Enc(template) prompt
    label [EOS]`` with only the label and EOS trained). ``template``: the encoder input, with ``{text}`` and
    ``{options}`` (classification), ``{question}`` (VQA) or no placeholder (image-text); a list = one drawn
    at random per sample. ``prompt``: decoder text between the input and the label (VQA: ``answer:``).
    ``options``: the labels written into ``{options}`` (default: the sorted labels of the training
    records). VQA records are always instruction samples, so ``template``/``prompt`` apply to them in
    either format."""

    source: str
    name: str | None = None
    split: str = "train"
    weight: float = 1.0
    kind: str | None = None
    validation_split: str | None = "validation"
    validation_source: str | None = None
    format: Literal["lm", "instruction"] = "lm"
    template: str | list[str] | None = None
    prompt: str | None = None
    options: list[str] | None = None

    def templates(self, kind: str) -> list[str]:
        """The templates for records of `kind` (the configured ones, else the default)."""
        if self.template is None:
            return [DEFAULT_TEMPLATES[kind]]
        return [self.template] if isinstance(self.template, str) else list(self.template)

    def decoder_prompt(self, kind: str) -> str:
        """The decoder prompt for records of `kind` ("" for none)."""
        return self.prompt if self.prompt is not None else DEFAULT_PROMPTS.get(kind, "")


def stream_record_kind(stream: StreamConfig) -> str | None:
    """The record kind a stream holds: its `kind`, else its built-in dataset's; None for a file stream of
    mixed kinds."""
    if stream.kind is not None:
        return stream.kind
    from metalm.data.builtin import BUILTIN_DATASETS

    dataset = BUILTIN_DATASETS.get(stream.source)
    return dataset.kind if dataset is not None else None


def layouts_from_streams(streams: list[StreamConfig], saved: dict[str, Any] | None = None) -> dict[str, Any]:
    """The request layouts (`metalm.data.layouts`) these streams train, over `saved` ones (a model trained
    further keeps the layouts of what it is not retrained on). VQA records are always laid out by their
    stream's template and prompt; image-text records in `lm` format are the image then the caption; in
    `instruction` format, like classification records, they follow their template and prompt."""
    layouts = {k: dict(v) for k, v in (saved or {}).items()}
    record_kinds = {"vqa": "vqa", "caption": "image_text", "classification": "classification"}
    for stream in streams:
        kind = stream_record_kind(stream)
        for layout, record_kind in record_kinds.items():
            if kind not in (record_kind, None):
                continue
            if record_kind == "vqa" or stream.format == "instruction":
                layouts[layout] = {
                    "template": stream.templates(record_kind)[0],
                    "prompt": stream.decoder_prompt(record_kind),
                }
            elif record_kind == "image_text" and kind == "image_text":
                layouts[layout] = {"template": "", "prompt": ""}
    return layouts


@dataclass
class DataConfig:
    """``seq_len``: decoder positions per sample (text windows are exactly this long; longer samples are
    truncated, see docs). ``mix``: draw the stream per ``sample`` (rows of one batch mix streams) or per
    ``batch`` (each batch from one stream: much less padding when streams differ in length)."""

    streams: list[StreamConfig]
    seq_len: int = 512
    skip_bad: bool = False
    check_images: bool = False
    mix: Literal["sample", "batch"] = "sample"
    max_records: int | None = None
    image_cache_mb: int = 1024


@dataclass
class OptimConfig:
    """AdamW with linear warm-up then linear decay to 0 at ``max_steps`` (optimizer steps).
    ``batch_size`` is per device and per micro-batch: one optimizer step sees
    ``batch_size * grad_accum * world_size`` samples."""

    lr: float = 3e-4
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    warmup_steps: int = 0
    max_steps: int = 1000
    grad_clip: float | None = 1.0
    grad_accum: int = 1
    batch_size: int = 8


@dataclass
class RunConfig:
    """``eval_every``/``save_every``/``log_every`` in optimizer steps (0: never, except that validation
    and the final model always happen at the end). ``resume``: continue from the newest valid checkpoint
    in ``output_dir`` if there is one (an error if there are checkpoints and none verifies); ``false``:
    an error if there are checkpoints; ``restart``: move any checkpoints aside and start from step 0.
    ``fsdp``: shard parameters, gradients and optimizer state over the processes with FSDP2 (needs
    ``torchrun``/``accelerate launch``; an accelerate config with ``distributed_type: FSDP`` turns it on
    too)."""

    output_dir: str = "runs/metalm"
    seed: int = 0
    eval_every: int = 0
    eval_batches: int = 8
    save_every: int = 0
    keep_checkpoints: int = 2
    log_every: int = 10
    mixed_precision: Literal["no", "bf16"] = "no"
    resume: bool | Literal["restart"] = True
    tensorboard: bool = True
    fsdp: bool = False


@dataclass
class TrainConfig:
    data: DataConfig
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    init_from: str | None = None
    # Where the config came from (not a YAML key): used in messages only.
    source: str | None = field(default=None, repr=False, compare=False)


_NOT_KEYS = {(TrainConfig, "source")}


# --------------------------------------------------------------------------------------------
# Generic conversion of plain YAML data into the dataclasses above


class _FieldError(Exception):
    def __init__(self, path: str, message: str) -> None:
        super().__init__(message)
        self.path = path
        self.message = message


def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return repr(value)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if tp is type(None):
        return "null"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is list:
        item = typing.get_args(tp)[0]
        return "a list of mappings" if dataclasses.is_dataclass(item) else f"a list of {_type_name(item)}"
    if origin is tuple:
        return f"a list of {len(typing.get_args(tp))} numbers"
    if origin is dict or tp is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, path: str) -> Any:
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise _FieldError(path, f"expected {_type_name(tp)}, got null")
        errors = []
        for arm in args:
            if arm is type(None):
                continue
            try:
                return _convert(value, arm, path)
            except _FieldError as err:
                errors.append(err)
        # A single non-null arm: its own message is the most precise.
        if len(errors) == 1:
            raise errors[0]
        raise _FieldError(path, f"expected {_type_name(tp)}, got {_describe(value)}")
    if origin is Literal:
        # YAML 1.1 reads a bare `no` as false: `mixed_precision: no` means "no".
        if isinstance(value, bool) and ("no", "yes")[value] in typing.get_args(tp):
            value = ("no", "yes")[value]
        if value not in typing.get_args(tp):
            raise _FieldError(path, f"expected {_type_name(tp)}, got {_describe(value)}")
        return value
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path)
    if origin is list:
        if not isinstance(value, list):
            raise _FieldError(path, f"expected {_type_name(tp)}, got {_describe(value)}")
        (item,) = typing.get_args(tp)
        return [_convert(v, item, _join(path, i)) for i, v in enumerate(value)]
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, list | tuple) or len(value) != len(args):
            raise _FieldError(path, f"expected {_type_name(tp)}, got {_describe(value)}")
        return tuple(_convert(v, a, _join(path, i)) for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise _FieldError(path, f"expected a mapping, got {_describe(value)}")
        for k in value:
            if not isinstance(k, str):
                raise _FieldError(path, f"keys must be strings, got {k!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise _FieldError(path, f"expected bool (true/false), got {_describe(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _FieldError(path, f"expected int, got {_describe(value)}")
        return value
    if tp is float:
        if isinstance(value, bool):
            raise _FieldError(path, f"expected float, got {_describe(value)}")
        if isinstance(value, int | float):
            return float(value)
        # YAML 1.1 reads `1e-4` (no dot) as a string; accept any string Python reads as a number.
        if isinstance(value, str):
            try:
                out = float(value)
            except ValueError:
                pass
            else:
                if math.isfinite(out):
                    return out
        raise _FieldError(path, f"expected float, got {_describe(value)}")
    if tp is str:
        if not isinstance(value, str):
            raise _FieldError(path, f"expected str, got {_describe(value)}")
        return value
    raise TypeError(f"unsupported config type {tp!r} at {path}")  # a bug in the schema, not the file


def _build(cls: type, data: Any, path: str) -> Any:
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise _FieldError(path or "<top level>", f"expected a mapping, got {_describe(data)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if (cls, f.name) not in _NOT_KEYS}
    for key in data:
        if key not in fields:
            raise _FieldError(
                _join(path, str(key)), f"unknown key; allowed keys here: {', '.join(sorted(fields))}"
            )
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], _join(path, name))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise _FieldError(_join(path, name), "missing required key")
    return cls(**kwargs)


# --------------------------------------------------------------------------------------------
# Semantic checks (values, not types)


def check_template(template: str, kind: str) -> str | None:
    """None when `template` is a valid instruction template for records of `kind`, else the reason."""
    allowed = TEMPLATE_FIELDS[kind]
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as err:  # unbalanced braces
        return f"invalid template {template!r}: {err} (write a literal brace as {{{{ or }}}})"
    used = set()
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if name == "" or name.isdigit():
            return f"template {template!r}: positional placeholders ('{{}}') are not allowed; name the field"
        if name not in allowed:
            can = f"can use {', '.join(f'{{{a}}}' for a in allowed)}" if allowed else "take no placeholders"
            return f"template {template!r}: unknown placeholder {{{name}}}; {kind} templates {can}"
        if spec or conversion:
            return f"template {template!r}: placeholder {{{name}}} takes no format spec or conversion"
        used.add(name)
    required = TEMPLATE_REQUIRED.get(kind)
    if required and required not in used:
        return f"template {template!r}: {kind} templates must contain {{{required}}}"
    return None


def _check_stream_format(s: StreamConfig, where: str, kind: str | None) -> None:
    """Instruction settings of one stream; `kind` is None when the records' kind is only known on reading
    (a JSONL stream without `kind`: then every kind a template could be for is tried)."""
    if s.format == "lm" and kind in ("classification", "image_text"):
        for key in ("template", "prompt", "options"):
            if getattr(s, key) is not None:
                raise _FieldError(
                    f"{where}.{key}",
                    f"applies to format: instruction; this {kind} stream has format: lm (set "
                    f"{where}.format: instruction)",
                )
        return
    if s.format == "instruction" and kind not in (None, *TEMPLATE_FIELDS):
        raise _FieldError(
            f"{where}.format",
            f"instruction samples are built from classification, vqa and image_text records; this stream's "
            f"records are {kind!r}",
        )
    if s.options is not None:
        if s.format == "lm":
            raise _FieldError(f"{where}.options", "applies to format: instruction (classification records)")
        if kind not in (None, "classification"):
            raise _FieldError(f"{where}.options", f"applies to classification records, not {kind!r}")
        if not s.options or any(not o.strip() for o in s.options) or len(set(s.options)) != len(s.options):
            raise _FieldError(f"{where}.options", "must be a non-empty list of distinct, non-empty labels")
    if s.template is None:
        return
    templates = [s.template] if isinstance(s.template, str) else s.template
    if not templates:
        raise _FieldError(f"{where}.template", "an empty list; give at least one template (or leave it out)")
    # In format lm only VQA records read a template.
    kinds = [kind] if kind is not None else list(TEMPLATE_FIELDS) if s.format == "instruction" else ["vqa"]
    for j, template in enumerate(templates):
        path = f"{where}.template" if isinstance(s.template, str) else f"{where}.template[{j}]"
        reasons = [check_template(template, k) for k in kinds]
        if all(reasons):  # fits no kind it could be for
            raise _FieldError(path, reasons[0])


def _check(cfg: TrainConfig) -> None:
    from metalm.data.builtin import BUILTIN_DATASETS, SPLITS

    def positive(path: str, value: float, strict: bool = True) -> None:
        if value < 0 or (strict and value == 0):
            raise _FieldError(path, f"must be {'> 0' if strict else '>= 0'}, got {value}")

    m = cfg.model
    if cfg.init_from is None:
        if m.decoder is None:
            raise _FieldError("model.decoder", "missing required key (or set init_from to a saved MetaLM)")
        if isinstance(m.decoder, dict) and "model_type" not in m.decoder:
            raise _FieldError("model.decoder", "a decoder config needs 'model_type' (e.g. llama, gpt2)")
        if isinstance(m.decoder, dict) and m.tokenizer is None:
            raise _FieldError("model.tokenizer", "a decoder built from a config needs a tokenizer")
    else:
        for key in ("decoder", "tokenizer"):
            if getattr(m, key) is not None:
                raise _FieldError(
                    f"model.{key}", "cannot be set together with init_from (the saved model's is used)"
                )
        if m.encoders is not None:
            raise _FieldError(
                "model.encoders",
                "cannot be set together with init_from (the saved model's are used); leave it out",
            )
    if m.semi_causal is not None:
        for key, value in m.semi_causal.items():
            where = f"model.semi_causal.{key}"
            if key not in SEMI_CAUSAL_KEYS:
                raise _FieldError(where, f"unknown key; allowed keys here: {', '.join(SEMI_CAUSAL_KEYS)}")
            if key == "span_fraction":
                if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1:
                    raise _FieldError(where, f"expected a float in [0, 1), got {_describe(value)}")
            elif isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise _FieldError(where, f"expected an int >= 1, got {_describe(value)}")
        lo, hi = m.semi_causal.get("span_min"), m.semi_causal.get("span_max")
        if lo is not None and hi is not None and lo > hi:
            raise _FieldError("model.semi_causal", f"span_min ({lo}) > span_max ({hi})")
    if m.lora is not None:
        if m.decoder_trainable:
            raise _FieldError(
                "model.decoder_trainable",
                "cannot be true with model.lora: LoRA trains adapters on a frozen decoder (set it to false "
                "or leave it out)",
            )
        positive("model.lora.r", m.lora.r)
        positive("model.lora.alpha", m.lora.alpha)
        if not 0 <= m.lora.dropout < 1:
            raise _FieldError("model.lora.dropout", f"must be in [0, 1), got {m.lora.dropout}")
        if m.lora.target_modules is not None and not m.lora.target_modules:
            raise _FieldError("model.lora.target_modules", "an empty list; name modules or leave it out")
    names = set()
    for i, enc in enumerate(m.encoders or []):
        where = f"model.encoders[{i}]"
        if not enc.name.isidentifier():
            raise _FieldError(f"{where}.name", f"must be an identifier, got {enc.name!r}")
        if enc.name in names:
            raise _FieldError(f"{where}.name", f"duplicate encoder name {enc.name!r}")
        names.add(enc.name)
        if enc.kind not in ("text", "vision"):
            raise _FieldError(f"{where}.kind", f"expected 'text' or 'vision', got {enc.kind!r}")
        if enc.source == "config" and enc.config is None:
            raise _FieldError(f"{where}.config", "source 'config' needs a config mapping with 'model_type'")
        conn = enc.connector if isinstance(enc.connector, str) else enc.connector.get("type")
        if conn not in ("linear", "mlp", "resampler"):
            raise _FieldError(f"{where}.connector", f"expected linear, mlp or resampler, got {conn!r}")
        if enc.trainable_layers is not None and enc.trainable_layers < 0:
            raise _FieldError(f"{where}.trainable_layers", "must be >= 0 (or null for all layers)")
        positive(f"{where}.image_size", enc.image_size)

    d = cfg.data
    if not d.streams:
        raise _FieldError("data.streams", "needs at least one stream")
    seen = set()
    for i, s in enumerate(d.streams):
        where = f"data.streams[{i}]"
        if s.name is None:
            s.name = Path(s.source).stem if s.source not in BUILTIN_DATASETS else s.source
        if s.name in seen:
            raise _FieldError(f"{where}.name", f"duplicate stream name {s.name!r}; give each stream a name")
        seen.add(s.name)
        positive(f"{where}.weight", s.weight)
        if s.kind is not None and s.kind not in RECORD_KINDS:
            raise _FieldError(f"{where}.kind", f"expected one of {', '.join(RECORD_KINDS)}, got {s.kind!r}")
        for key in ("source", "validation_source"):
            src = getattr(s, key)
            if src is None or src in BUILTIN_DATASETS:
                continue
            if not Path(src).exists():
                raise _FieldError(
                    f"{where}.{key}",
                    f"{src!r} is neither a built-in dataset ({', '.join(BUILTIN_DATASETS)}) "
                    "nor an existing JSONL file or folder",
                )
        for key in ("split", "validation_split"):
            value = getattr(s, key)
            if value is not None and value not in SPLITS:
                raise _FieldError(f"{where}.{key}", f"expected one of {', '.join(SPLITS)}, got {value!r}")
        kind = s.kind or (BUILTIN_DATASETS[s.source].kind if s.source in BUILTIN_DATASETS else None)
        _check_stream_format(s, where, kind)
    if d.seq_len < 8:
        raise _FieldError("data.seq_len", f"must be >= 8, got {d.seq_len}")
    if d.max_records is not None:
        positive("data.max_records", d.max_records)
    positive("data.image_cache_mb", d.image_cache_mb, strict=False)

    o = cfg.optim
    positive("optim.lr", o.lr)
    positive("optim.weight_decay", o.weight_decay, strict=False)
    for j, b in enumerate(o.betas):
        if not 0 <= b < 1:
            raise _FieldError(f"optim.betas[{j}]", f"must be in [0, 1), got {b}")
    positive("optim.eps", o.eps)
    positive("optim.warmup_steps", o.warmup_steps, strict=False)
    positive("optim.max_steps", o.max_steps)
    if o.grad_clip is not None:
        positive("optim.grad_clip", o.grad_clip)
    positive("optim.grad_accum", o.grad_accum)
    positive("optim.batch_size", o.batch_size)

    r = cfg.run
    for key in ("eval_every", "save_every", "log_every"):
        positive(f"run.{key}", getattr(r, key), strict=False)
    positive("run.eval_batches", r.eval_batches, strict=False)
    positive("run.keep_checkpoints", r.keep_checkpoints)
    if not r.output_dir:
        raise _FieldError("run.output_dir", "must not be empty")
    # `init_from` is checked when training starts: a preset may name a model an earlier run produces.


# --------------------------------------------------------------------------------------------
# Loading


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """`top` over `base`: mappings merge key by key, anything else (lists included) is replaced."""
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _read_yaml(path: Path, shown: str, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{shown}: no such config file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError(f"{shown}: invalid YAML: {err}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{shown}: expected a mapping at the top level, got {_describe(data)}")
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise ConfigError(f"{shown}: extends: expected a file name, got {_describe(parent)}")
    # `extends` is relative to the file that names it.
    base_path = (path.parent / parent).resolve()
    if base_path in chain:
        raise ConfigError(f"{shown}: extends: {parent!r} extends itself (a cycle)")
    base = _read_yaml(base_path, str(Path(shown).parent / parent), (*chain, path.resolve()))
    if data.get("init_from") is not None and isinstance(base.get("model"), dict):
        # A file that starts from a saved model keeps its base's settings but not the base's architecture:
        # the saved model fixes the decoder, tokenizer and encoders.
        base["model"] = {k: v for k, v in base["model"].items() if k not in INIT_FROM_FIXED}
    return _deep_merge(base, data)


def _parse_override(text: str) -> tuple[list[str | int], Any]:
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {text!r}: expected key.path=value, e.g. optim.lr=1e-4")
    parts: list[str | int] = []
    for piece in key.split("."):
        if not piece:
            raise ConfigError(f"override {text!r}: empty key in {key!r}")
        parts.append(int(piece) if piece.isdigit() else piece)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        raise ConfigError(f"override {text!r}: cannot parse the value: {err}") from None
    return parts, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, list[str | int]]:
    """Apply ``key.path=value`` overrides to raw config data in place (values parsed as YAML; a number
    in the path indexes a list: ``data.streams.0.weight=2``). Returns {override text: key parts}."""
    applied = {}
    for text in overrides:
        parts, value = _parse_override(text)
        node: Any = data
        for depth, part in enumerate(parts):
            last = depth == len(parts) - 1
            here = ".".join(str(p) for p in parts[: depth + 1])
            if isinstance(part, int):
                if not isinstance(node, list):
                    raise ConfigError(f"override {text!r}: {here}: indexes a list, but the value is not one")
                if part >= len(node):
                    raise ConfigError(
                        f"override {text!r}: {here}: index out of range (the list has {len(node)})"
                    )
            elif not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {here}: the value above it is not a mapping")
            if last:
                node[part] = value
            else:
                if isinstance(node, dict) and part not in node:
                    node[part] = {}
                node = node[part]
        applied[text] = parts
    return applied


def _origin(path: str, applied: dict[str, list[str | int]], default: str) -> str:
    """Name the override that set `path` (or a mapping above it), else the file."""
    for text, parts in applied.items():
        prefix = ""
        for p in parts:
            prefix = _join(prefix, p)
        if path == prefix or path.startswith(prefix + ".") or path.startswith(prefix + "["):
            return f"override {text!r}"
    return default


def config_from_dict(
    data: dict[str, Any], *, source: str = "<config>", overrides: list[str] | None = None
) -> TrainConfig:
    """Validate raw data (e.g. parsed YAML) into a :class:`TrainConfig`; raises :class:`ConfigError`."""
    import copy

    data = copy.deepcopy(data)
    data.pop("extends", None)
    applied = apply_overrides(data, list(overrides or []))
    try:
        cfg = _build(TrainConfig, data, "")
        _check(cfg)
    except _FieldError as err:
        raise ConfigError(f"{_origin(err.path, applied, source)}: {err.path}: {err.message}") from None
    cfg.source = source
    return cfg


def load_config(path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    """Read a YAML training config (following ``extends``), apply ``key=value`` overrides, validate."""
    shown = str(path)
    data = _read_yaml(Path(path), shown)
    return config_from_dict(data, source=shown, overrides=overrides)


def config_to_dict(cfg: TrainConfig) -> dict[str, Any]:
    """Plain data (YAML/JSON-ready) for a config; `config_from_dict` reads it back."""
    out = dataclasses.asdict(cfg)
    out.pop("source", None)
    out["optim"]["betas"] = list(cfg.optim.betas)
    return out
