"""MetaLMForCausalLM: any HF causal LM as the interface, with bidirectional encoders docked on its input.

A batch (see `metalm.data.segments.collate`) carries the decoder's `input_ids` (pad ids at encoded slots),
`attention_mask`, `position_ids` and `labels`, plus for each encoder its payloads (`encoder_inputs[name]`)
and a boolean map of the decoder slots they fill (`encoder_slots[name]`). The forward pass:

1. embed the tokens with the decoder's own embedding module (so e.g. Gemma's sqrt(d) scale applies);
2. run each encoder once over all its payloads in the batch and project them with its connector;
3. scatter the projected vectors, in reading order, into the slots (a count mismatch raises);
4. run the purely causal decoder on `inputs_embeds`. There is no cross-attention.
"""

from __future__ import annotations

import functools
import inspect
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PreTrainedModel

from metalm.model import objectives
from metalm.model.configuration_metalm import MetaLMConfig, MetaLMConfigError, normalize_encoder_spec
from metalm.model.connectors import build_connector
from metalm.model.encoders import DockedEncoder, apply_trainable_layers
from metalm.model.loading import check_model_folder
from metalm.model.objectives import labelled_positions

EncoderInputs = dict[str, dict[str, torch.Tensor]]


class SlotCountError(ValueError):
    """The encoded features do not fill their decoder slots exactly."""


class MetaLMPreTrainedModel(PreTrainedModel):
    config_class = MetaLMConfig
    config: MetaLMConfig
    base_model_prefix = "metalm"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _no_split_modules: list[str] = []

    def _init_weights(self, module: nn.Module) -> None:
        # Decoder and encoders initialise themselves (or come pretrained); only connectors are ours.
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


class MetaLMForCausalLM(MetaLMPreTrainedModel, GenerationMixin):
    """A causal decoder with docked encoders, trained with semi-causal language modeling."""

    def __init__(
        self,
        config: MetaLMConfig,
        decoder: PreTrainedModel | None = None,
        encoder_backbones: dict[str, nn.Module] | None = None,
    ) -> None:
        super().__init__(config)
        if decoder is None:
            decoder = AutoModelForCausalLM.from_config(config.text_config)
        self.decoder = decoder
        encoder_backbones = encoder_backbones or {}
        self.encoders = nn.ModuleDict()
        self.connectors = nn.ModuleDict()
        for spec in config.encoders:
            self._dock(spec, encoder_backbones.get(spec["name"]))
        # Connectors are built here, so only they are initialised by the model's hook; after every
        # encoder is built, so that a seed gives the same weights whatever the number of encoders.
        for connector in self.connectors.values():
            connector.apply(self._init_weights)
        self.apply_freezing()
        self.post_init()

    def _dock(self, spec: dict[str, Any], backbone: nn.Module | None) -> None:
        """The encoder of `spec` (its backbone, or one built from the spec) and a connector to the
        decoder's width (initialised by the caller)."""
        encoder = DockedEncoder(spec, backbone)
        self.encoders[spec["name"]] = encoder
        try:
            self.connectors[spec["name"]] = build_connector(
                spec["connector"],
                encoder.hidden_size,
                self.config.text_config.hidden_size,
                spec.get("num_slots"),
            )
        except ValueError as err:
            raise MetaLMConfigError(f"encoder {spec['name']!r}: {err}") from None

    def add_encoder(self, spec: dict[str, Any], backbone: nn.Module | None = None) -> None:
        """Dock one more encoder on a built (e.g. loaded) model: `spec` joins the config, its backbone
        (or one built from the spec) and a fresh connector join the model; nothing else changes. The
        processor needs the encoder's preprocessor too (`metalm.recipe.dock_encoders` does both)."""
        spec = normalize_encoder_spec(spec)
        if spec["name"] in self.encoders:
            raise MetaLMConfigError(f"the model already has an encoder named {spec['name']!r}")
        self.config.encoders.append(spec)
        self._dock(spec, backbone)
        self.connectors[spec["name"]].apply(self._init_weights)
        param = next(self.decoder.parameters())  # a loaded model may sit on a device, in another dtype
        self.encoders[spec["name"]].to(param.device)
        self.connectors[spec["name"]].to(param.device, param.dtype)
        self.apply_freezing()

    # --- HF plumbing -------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, *args: Any, **kwargs: Any):
        # A broken local folder raises one line (ModelLoadError), not a traceback from inside transformers.
        folder = Path(pretrained_model_name_or_path or "", kwargs.get("subfolder") or "")
        if pretrained_model_name_or_path and folder.is_dir():
            check_model_folder(folder)
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    def get_input_embeddings(self) -> nn.Module:
        return self.decoder.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.decoder.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module | None:
        return self.decoder.get_output_embeddings()

    def init_weights(self) -> None:
        # The parts arrive initialised (random from their configs, or pretrained); re-initialising
        # them here would wipe pretrained encoders.
        return

    def apply_freezing(self) -> None:
        """Set requires_grad from the config: per-encoder `trainable_layers`, `decoder_trainable`."""
        for spec in self.config.encoders:
            backbone = self.encoders[spec["name"]].backbone
            backbone.requires_grad_(True)
            apply_trainable_layers(backbone, spec["trainable_layers"])
        self.decoder.requires_grad_(bool(self.config.decoder_trainable))
        self.train(self.training)  # frozen lower parts (which the split points decide) to eval mode

    def train(self, mode: bool = True) -> MetaLMForCausalLM:
        # Frozen BatchNorm statistics must not drift either: frozen BN modules stay in eval mode.
        super().train(mode)
        for module in self.encoders.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and not any(
                p.requires_grad for p in module.parameters()
            ):
                module.eval()
        return self

    # --- the MetaLM input ----------------------------------------------------------------------------
    def encode(self, name: str, payload: dict[str, torch.Tensor]) -> torch.Tensor:
        """Run encoder `name` over all its payloads and return the projected slot vectors, [S, width],
        in reading order (payload by payload, position by position)."""
        projected, mask = self.encode_padded(name, payload)
        return projected[mask]

    def encode_padded(self, name: str, payload: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Projected slot vectors per payload, [N, S_max, width], and the mask of each payload's own slots."""
        features, mask = self.encoders[name](payload)
        return self.connectors[name](features, mask)

    def embed_inputs(
        self,
        input_ids: torch.LongTensor,
        encoder_inputs: EncoderInputs | None = None,
        encoder_slots: dict[str, torch.Tensor] | None = None,
        encoder_transcripts: dict[str, dict[str, torch.Tensor]] | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Decoder input embeddings with every encoder's projected outputs scattered into its slots. With
        `encoder_transcripts` (see `metalm.data.segments.collate`), also the weighted sum of their
        transcript losses: (embeddings, loss)."""
        embeds = self.decoder.get_input_embeddings()(input_ids)
        extra = embeds.new_zeros((), dtype=torch.float32)
        encoder_inputs = encoder_inputs or {}
        encoder_slots = encoder_slots or {}
        if set(encoder_inputs) != set(encoder_slots):
            raise SlotCountError(
                f"encoder_inputs names {sorted(encoder_inputs)} differ from encoder_slots {sorted(encoder_slots)}"
            )
        for name, payload in encoder_inputs.items():
            if name not in self.encoders:
                raise SlotCountError(f"no encoder named {name!r}; this model has {list(self.encoders)}")
            slots = encoder_slots[name].to(torch.bool)
            projected, mask = self.encode_padded(name, payload)
            vectors = projected[mask]
            heard = (encoder_transcripts or {}).get(name)
            if heard is not None:
                loss = objectives.transcript_loss(self, projected, mask, heard["ids"], heard["lengths"])
                extra = extra + heard["weight"].to(loss.device) * loss
            if vectors.shape[0] != int(slots.sum()):
                raise SlotCountError(
                    f"encoder {name!r} produced {vectors.shape[0]} vectors for {int(slots.sum())} decoder slots"
                )
            if not torch.isfinite(vectors).all():
                raise ValueError(
                    f"encoder {name!r} produced non-finite features (NaN/Inf): check its inputs "
                    "(pixel values, token ids) and, in training, the learning rate"
                )
            embeds = embeds.masked_scatter(slots.unsqueeze(-1), vectors.to(embeds.dtype))
        return embeds if encoder_transcripts is None else (embeds, extra)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        encoder_inputs: EncoderInputs | None = None,
        encoder_slots: dict[str, torch.Tensor] | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        labelled_logits_only: bool | None = None,
        sequence_ids: torch.LongTensor | None = None,
        encoder_transcripts: dict[str, dict[str, torch.Tensor]] | None = None,
        typed_twins: dict[str, Any] | None = None,
        **kwargs: Any,
    ):
        """Labels follow the HF convention (unshifted; -100 = no loss); `metalm.data.segments` builds
        them with the semi-causal labelling rules.

        `labelled_logits_only` (default: in training mode): with `labels` and no `logits_to_keep` of the
        caller's, the LM head runs only on the positions that predict a label. The loss is the full-head loss
        (same terms, same normalisation), and `logits` then holds just those positions, flattened to
        [targets, vocab] in row-major order. A semi-causal batch labels a fraction of its positions, and
        with a large vocabulary (Gemma: 262k) the head is most of a training step's cost; in eval mode the
        logits keep the usual [batch, positions, vocab] shape.

        `sequence_ids` (a packed batch, see `metalm.data.segments.collate`): rows hold several samples, each
        with position ids restarting at 0. The decoder then gets no 2D mask, only the position ids, from
        which transformers' mask functions build the block-diagonal causal mask (per-sample sliding windows
        too) and flash attention its varlen boundaries; padding (position id 0 after a sample) becomes
        one-position blocks that no real position attends to. See `supports_packing`.

        `encoder_transcripts` (training, `model.encoders[].transcript_loss`): the returned `loss` adds the
        encoders' weighted `transcript_loss`es, whose sum is also returned alone as `transcript_loss`.
        `typed_twins` (training, a stream's `typed_twin`): the loss adds `typed_twin_loss`, also returned alone."""
        transcript_loss = None
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("pass input_ids (with encoder_inputs/encoder_slots) or inputs_embeds")
            inputs_embeds = self.embed_inputs(input_ids, encoder_inputs, encoder_slots, encoder_transcripts)
            if encoder_transcripts is not None:
                inputs_embeds, transcript_loss = inputs_embeds
        elif encoder_inputs:
            raise ValueError("encoder_inputs are already part of inputs_embeds; pass one or the other")
        if sequence_ids is not None:
            if position_ids is None:
                raise ValueError("a packed batch (sequence_ids) needs the position_ids its collate built")
            attention_mask = None
            # transformers looks for packed rows only without a KV cache (which a packed batch, never a
            # generation prompt, has no use for).
            kwargs["use_cache"] = False
        if labelled_logits_only is None:
            labelled_logits_only = self.training
        if (
            labelled_logits_only
            and labels is not None
            and _keeps_all(logits_to_keep)
            and self._head_takes_mask()
        ):
            logits_to_keep, kwargs["shift_labels"] = labelled_positions(labels)
        if typed_twins is not None and labels is not None:
            kwargs["output_hidden_states"] = True
        out = self.decoder(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            labels=labels,
            # Named here so generate() sees it and computes prefill logits for the last position only.
            **({} if _keeps_all(logits_to_keep) else {"logits_to_keep": logits_to_keep}),
            **kwargs,
        )
        if transcript_loss is not None:
            out["transcript_loss"] = transcript_loss.detach()
            if out.loss is not None:
                out["loss"] = out.loss + transcript_loss.to(out.loss.dtype)
        if typed_twins is not None and labels is not None:
            twin_loss = objectives.typed_twin_loss(self, out.hidden_states, labels, typed_twins)
            out["typed_twin_loss"] = twin_loss.detach()
            out["loss"] = out.loss + twin_loss.to(out.loss.dtype)
        return out

    @torch.no_grad()
    def supports_packing(self) -> bool:
        """Whether the decoder keeps packed samples apart (see `forward`), measured rather than assumed:
        a decoder whose mask code ignores the position ids would let samples attend to each other. Two
        random 3-position sequences packed in one row must give the second one the logits it gets alone."""
        width = self.config.text_config.hidden_size
        param = next(self.decoder.parameters())
        generator = torch.Generator().manual_seed(0)
        embeds = torch.randn(1, 6, width, generator=generator).to(param.device, param.dtype)
        positions = torch.tensor([[0, 1, 2, 0, 1, 2]], device=param.device)
        was_training = self.decoder.training
        self.decoder.eval()  # dropout off: the two runs must be comparable
        try:
            packed = self.decoder(inputs_embeds=embeds, position_ids=positions, use_cache=False).logits[0, 3:]
            alone = self.decoder(inputs_embeds=embeds[:, 3:], position_ids=positions[:, :3], use_cache=False)
        finally:
            self.decoder.train(was_training)
        packed, alone = packed.float(), alone.logits[0].float()
        return bool(torch.allclose(packed, alone, rtol=1e-2, atol=1e-2 * float(alone.abs().max())))

    def _head_takes_mask(self) -> bool:
        """Whether the decoder's forward slices its head input with a boolean `logits_to_keep` mask."""
        return "logits_to_keep" in inspect.signature(self.decoder.forward).parameters and _mask_slicing()

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.LongTensor | None = None,
        encoder_inputs: EncoderInputs | None = None,
        encoder_slots: dict[str, torch.Tensor] | None = None,
        **kwargs: Any,
    ):
        """Generate from a prompt of segments. Encoded features are computed once, here; the KV cache
        takes over after the first step. Returns prompt ids followed by the new tokens; encoded slots
        show as pad ids in the prompt part."""
        kwargs.pop("labels", None)
        if input_ids is not None and "inputs_embeds" not in kwargs:
            kwargs["inputs_embeds"] = self.embed_inputs(input_ids, encoder_inputs, encoder_slots)
        if input_ids is not None and kwargs.get("attention_mask") is None:
            kwargs["attention_mask"] = self.real_positions(input_ids, encoder_slots, kwargs)
        return super().generate(input_ids=input_ids, **kwargs)

    def real_positions(
        self,
        input_ids: torch.LongTensor,
        encoder_slots: dict[str, torch.Tensor] | None,
        generate_kwargs: dict[str, Any],
    ) -> torch.Tensor:
        """The attention mask generate() would otherwise infer from pad ids. Encoded slots hold the pad id,
        so that inference would hide them; here slots always count as real, and pad ids elsewhere count as
        padding only when the pad id is not also the end-of-text id (as in HF's own inference)."""
        gen = generate_kwargs.get("generation_config") or self.generation_config
        pad = generate_kwargs.get("pad_token_id", gen.pad_token_id)
        eos = generate_kwargs.get("eos_token_id", gen.eos_token_id)
        eos_ids = set(eos if isinstance(eos, list) else [eos])
        mask = torch.ones_like(input_ids, dtype=torch.long)
        if pad is not None and pad not in eos_ids:
            mask = (input_ids != pad).long()
        for slots in (encoder_slots or {}).values():
            mask = mask | slots.to(mask.device, torch.long)
        return mask


def _keeps_all(logits_to_keep: int | torch.Tensor) -> bool:
    return isinstance(logits_to_keep, int) and logits_to_keep == 0


def decoder_cache_kwarg(decoder: nn.Module) -> str | None:
    """The keyword under which `decoder` takes a KV cache: transformers renamed `past_key_values` to `cache`
    during 5.x. None when its forward takes neither."""
    params = inspect.signature(decoder.forward).parameters
    return next((name for name in ("cache", "past_key_values") if name in params), None)


@functools.cache
def _mask_slicing() -> bool:
    """transformers' `slice_logits_to_keep` takes a boolean [B, T] mask (newer 5.x releases); with an
    older one the head runs on every position, as before."""
    try:
        from transformers.modeling_utils import slice_logits_to_keep
    except ImportError:
        return False
    try:
        out = slice_logits_to_keep(torch.zeros(1, 2, 1), torch.tensor([[True, False]]))
    except (IndexError, RuntimeError, TypeError):
        return False
    return tuple(out.shape) == (1, 1)


def register_auto_classes() -> None:
    """Register MetaLM with AutoConfig / AutoModelForCausalLM (idempotent)."""
    try:
        AutoConfig.register("metalm", MetaLMConfig)
    except ValueError:
        pass
    try:
        AutoModelForCausalLM.register(MetaLMConfig, MetaLMForCausalLM)
    except ValueError:
        pass


# `import metalm` registers lazily (metalm/__init__.py); importing the model class registers it as well.
register_auto_classes()
