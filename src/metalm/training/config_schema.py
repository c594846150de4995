"""The training-config schema: pydantic models with strict validation (the sections ``model``, ``data``,
``optim``, ``run``, ``init_from``; see ``docs/training.md``). Loading YAML into them is
:mod:`metalm.training.config_loading`; everything is imported from :mod:`metalm.training.config`."""

from __future__ import annotations

import copy
from typing import Annotated, Any, Literal

from pydantic import (
    BeforeValidator,
    Field,
    PrivateAttr,
    field_validator,
    model_validator,
)

from metalm.modalities import encoder_kinds
from metalm.model.connectors import CONNECTOR_TYPES
from metalm.recipe import EncoderRecipe, ModelRecipe
from metalm.schema import FieldProblem
from metalm.training.config_base import Float, UnitFloat, _no_as_text, _one_of, _Section
from metalm.training.config_messages import describe as _describe
from metalm.training.data_config import DataConfig, StreamConfig

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

SEMI_CAUSAL_KEYS = ("span_min", "span_max", "span_fraction")
# What a saved model (`init_from`) fixes: a config that starts from one cannot set these (`encoders` there
# lists encoders to add, so a base config's are not inherited either).
INIT_FROM_FIXED = ("decoder", "tokenizer", "encoders")


class ConfigError(ValueError):
    """A training config is invalid; the message names the file (or override) and the key path."""


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


class ModelConfig(_Section):
    """What to build (mirrors :class:`metalm.ModelRecipe`). ``decoder``: an HF config dict with
    ``model_type`` (trained from scratch) or a local folder. With ``init_from`` set at the top level,
    leave ``decoder``/``tokenizer`` out; ``encoders`` then lists encoders the saved model lacks, docked
    with fresh connectors (the saved ones are kept as they are); ``semi_causal``, ``decoder_trainable`` and
    ``trainable_layers`` (encoder name → how many top layers train, e.g. ``{text: 2}``) then override the
    saved model's settings, and ``connector_positions`` (encoder name → ``learned``) gives a saved vision
    encoder's connector learned slot positions (zero at first). ``decoder_trainable: null`` = True for a new model, the saved value for
    ``init_from``. ``lora``: train LoRA adapters on a frozen decoder (see :class:`LoraSettings`)."""

    decoder: str | dict[str, Any] | None = None
    tokenizer: str | None = None
    encoders: list[EncoderRecipe] | None = None
    semi_causal: dict[str, Any] | None = None
    decoder_trainable: bool | None = None
    trainable_layers: dict[str, Annotated[int, Field(ge=0)]] | None = None
    connector_positions: dict[str, Literal["learned"]] | None = None
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
            positions = None if isinstance(enc.connector, str) else enc.connector.get("positions")
            if positions is not None and enc.kind != "vision":
                raise FieldProblem(
                    "positions: learned is for a vision encoder's slots (a fixed count, one per map position)",
                    i,
                    "connector",
                )
            if enc.feature_layer is not None and enc.kind != "vision":
                raise FieldProblem(
                    "is a vision encoder's field (the layer its slots read)", i, "feature_layer"
                )
            if enc.slot_grid is not None and (enc.kind != "vision" or enc.slot_grid <= 0):
                raise FieldProblem("takes an int > 0, on a vision encoder (slots a side)", i, "slot_grid")
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
            if self.connector_positions is not None:
                raise FieldProblem(
                    "adds positions to a saved model's connectors (with init_from); for a new model set "
                    "connector: {type: mlp, positions: learned} on the encoder in model.encoders",
                    "connector_positions",
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


class OptimConfig(_Section):
    """AdamW with linear warm-up over ``warmup_steps``, then the ``schedule``: ``linear`` decay to 0 at
    ``max_steps`` (optimizer steps), ``cosine`` decay to 0, ``constant``, or ``wsd`` (warm-up, stable,
    decay: the full rate until the last ``decay_steps``, then linear to 0; MiniCPM, Hägele et al. 2024),
    under which a run's late steps (a curriculum's last streams) still train at the full rate.
    ``batch_size`` is per device and per micro-batch: one optimizer step sees
    ``batch_size * grad_accum * world_size`` samples."""

    lr: Float = Field(3e-4, gt=0)
    weight_decay: Float = Field(0.01, ge=0)
    # Not strict: YAML gives a list, the schema keeps a tuple.
    betas: tuple[UnitFloat, UnitFloat] = Field((0.9, 0.95), strict=False)
    eps: Float = Field(1e-8, gt=0)
    warmup_steps: int = Field(0, ge=0)
    max_steps: int = Field(1000, gt=0)
    schedule: Literal["linear", "cosine", "constant", "wsd"] = "linear"
    decay_steps: int | None = Field(None, gt=0)  # wsd only; default: the last fifth of max_steps
    grad_clip: Annotated[Float, Field(gt=0)] | None = 1.0
    grad_accum: int = Field(1, gt=0)
    batch_size: int = Field(8, gt=0)

    @model_validator(mode="after")
    def _decay_fits(self) -> OptimConfig:
        if self.decay_steps is not None and self.schedule != "wsd":
            raise FieldProblem(
                f"applies to schedule: wsd only (the schedule is {self.schedule!r})", "decay_steps"
            )
        if self.schedule == "wsd" and self.warmup_steps + self.wsd_decay_steps > self.max_steps:
            raise FieldProblem(
                f"warmup_steps ({self.warmup_steps}) + decay_steps ({self.wsd_decay_steps}) exceed max_steps "
                f"({self.max_steps})",
                "decay_steps",
            )
        return self

    @property
    def wsd_decay_steps(self) -> int:
        """The steps of the wsd schedule's final decay."""
        return self.decay_steps if self.decay_steps is not None else max(1, self.max_steps // 5)


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
    def _every_step_draws_a_stream(self) -> TrainConfig:
        windows = [w for w in self.data.stream_steps() if w is not None]
        if len(windows) < len(self.data.streams):
            return self  # a stream without steps is drawn in every step
        step = 0
        for start, end in sorted(windows):  # walk the covered steps from 0
            if start > step:
                break
            step = max(step, self.optim.max_steps if end is None else end)
        if step < self.optim.max_steps:
            raise FieldProblem(
                f"no stream is drawn in step {step} (each stream has steps: [start, end] and none covers it; "
                f"optim.max_steps is {self.optim.max_steps})",
                "data", "streams",
            )  # fmt: skip
        return self

    @model_validator(mode="after")
    def _model_fits_init_from(self) -> TrainConfig:
        try:
            self.model.check_against_init_from(self.init_from)
        except FieldProblem as problem:
            raise FieldProblem(str(problem), "model", *problem.at) from None
        return self
