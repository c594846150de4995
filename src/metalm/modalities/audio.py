"""Audio encoders: speech read by Whisper's encoder (the packaged tiny.en, or a Whisper config), on the clip's
real length, with k adjacent output frames stacked into one slot.

The processor parts are `AudioInput` (a WAV/FLAC/OGG/MP3 file, bytes, a data URL, or an array of samples);
the preprocessor is transformers' `WhisperFeatureExtractor` (16 kHz, 80-bin log-mel, 10 ms hop), applied
to the clip as it is, not padded to 30 s. A segment's `payload` is its log-mel features [n_mels, T]; the
payload pads them to the batch's longest and records each clip's real length, and the backbone
(`metalm.model.whisper.WhisperAudioEncoder`) runs every clip on its own frames only.

Slots: Whisper gives one output frame per 20 ms; `frame_stack` k of them become one slot, so a clip of
s seconds fills ceil(50 s / k) slots (k = 4: 13 per second). The spec's connector (`mlp`) maps each
stacked k x d vector to the decoder's width: together, the frame-stacking connector.

Recipe settings (`EncoderRecipe.config`): `frame_stack` (default 4) and `max_seconds` (default 30, the
most Whisper's positions cover); with `source: config` the rest of the mapping is the Whisper encoder's
architecture (`metalm.model.whisper.WHISPER_TINY_EN`'s fields).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from metalm.data.audio import SAMPLING_RATE, AudioError, load_audio
from metalm.data.segment_types import EncodedSegment, InputError, SampleError
from metalm.modalities import register_modality
from metalm.modalities.base import Modality, Payload, Processor, source_name
from metalm.model.hf_config import MetaLMConfigError
from metalm.model.whisper import (
    PACKAGED_WHISPER,
    WHISPER_TINY_EN,
    WhisperAudioEncoder,
    encoder_fields,
    load_packaged_whisper_encoder,
    rows_by_length,
    whisper_encoder_config,
)

if TYPE_CHECKING:
    from transformers import WhisperFeatureExtractor

    from metalm.recipe import EncoderRecipe

WHISPER = "whisper"
# The audio settings a recipe's `config` may carry besides a Whisper architecture.
RECIPE_SETTINGS = {"frame_stack": 4, "max_seconds": 30.0}
# 10 ms per log-mel frame.
MEL_FRAMES_PER_SECOND = SAMPLING_RATE // 160


@dataclass
class AudioInput:
    """Speech for a named audio encoder: a file path, bytes, a ``data:audio/...;base64`` URL, or an array
    of samples ([T] or [T, channels]) at `sampling_rate` (default 16 kHz; files carry their own rate)."""

    audio: Any
    encoder: str | None = None
    sampling_rate: int | None = None
    # What the clip says, as decoder token ids (a training record's transcript): read only by the transcript
    # loss (`model.encoders[].transcript_loss`); never a label.
    transcript: list[int] | None = None


def probe_audio(seconds: float = 1.0) -> np.ndarray:
    """A fixed voiced-like signal: a rising chirp with two harmonics (content for an encoder, not noise)."""
    t = np.arange(int(SAMPLING_RATE * seconds)) / SAMPLING_RATE
    f0 = 120 + 80 * t
    wave = sum(0.3 / h * np.sin(2 * np.pi * h * f0 * t) for h in (1, 2, 3))
    return (wave * np.hanning(len(t)) ** 0.25).astype(np.float32)


def feature_extractor(spec: dict[str, Any]) -> WhisperFeatureExtractor:
    """Whisper's log-mel front end for the spec's number of mel bins (built locally; nothing is fetched)."""
    from transformers import WhisperFeatureExtractor

    return WhisperFeatureExtractor(feature_size=int(spec["config"]["num_mel_bins"]))


def log_mel(extractor: WhisperFeatureExtractor, samples: np.ndarray) -> torch.Tensor:
    """[n_mels, T] log-mel features of 16 kHz samples at their real length (T = len // 160)."""
    features = extractor(
        samples, sampling_rate=SAMPLING_RATE, padding="longest", truncation=False, return_tensors="np"
    ).input_features[0]
    return torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))


class AudioModality(Modality):
    kind = "audio"
    spec_defaults = dict(RECIPE_SETTINGS)
    backbones = (WHISPER,)
    part_types = (AudioInput,)
    record_field = "audio"
    missing_encoder_error = "the model has no audio encoder to hear this clip"
    packaged_sources = (PACKAGED_WHISPER,)

    def check_spec(self, spec: dict[str, Any]) -> None:
        k = spec["frame_stack"]
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"field 'frame_stack' must be an int >= 1, got {k!r}")
        seconds = spec["max_seconds"]
        if not isinstance(seconds, int | float) or isinstance(seconds, bool) or not 0 < seconds <= 30:
            raise ValueError(f"field 'max_seconds' must be a number in (0, 30], got {seconds!r}")
        if not isinstance(spec.get("config"), dict):
            raise ValueError("field 'config' must hold the Whisper encoder's fields")
        try:
            whisper_encoder_config(spec["config"])
        except ValueError as err:
            raise ValueError(f"field 'config': {err}") from None

    def num_slots(self, spec: dict[str, Any], payload_size: int | None) -> int:
        if payload_size is None:
            raise ValueError("an audio clip needs its number of mel frames")
        return -(-WhisperAudioEncoder.num_frames(payload_size) // spec["frame_stack"])

    # --- the model ---------------------------------------------------------------------------------
    def build_backbone(self, spec: dict[str, Any]) -> nn.Module:
        return WhisperAudioEncoder(whisper_encoder_config(spec["config"]), spec["frame_stack"])

    def encode(
        self, backbone: nn.Module, spec: dict[str, Any], payload: Payload
    ) -> tuple[torch.Tensor, torch.Tensor]:
        features = payload["input_features"].to(next(backbone.parameters()).dtype)
        return backbone(features, payload["mel_lengths"])

    # --- the frozen lower part: Whisper splits between its layers (`trainable_layers` below all) -------
    def lower_modules(self, backbone: nn.Module, spec: dict[str, Any]) -> list[nn.Module] | None:
        frozen = _frozen_layers(backbone, spec)
        if frozen is None:
            return super().lower_modules(backbone, spec)
        w = backbone.whisper
        return [w.conv1, w.conv2, w.embed_positions, *list(w.layers)[:frozen]]

    def encode_lower(self, backbone: nn.Module, spec: dict[str, Any], payload: Payload) -> list[Payload]:
        frozen = _frozen_layers(backbone, spec)
        if frozen is None:
            return super().encode_lower(backbone, spec, payload)
        features = payload["input_features"].to(next(backbone.parameters()).dtype)
        lengths = [int(n) for n in payload["mel_lengths"].tolist()]
        states: list[Payload] = [{} for _ in lengths]
        for rows, length in rows_by_length(lengths):
            hidden = backbone.lower_frames(features[rows, :, :length], frozen)
            for i, row in zip(rows, hidden):
                # Its own contiguous storage: a cached row is saved alone.
                states[i] = {"hidden": row.clone(memory_format=torch.contiguous_format)}
        return states

    def encode_upper(
        self, backbone: nn.Module, spec: dict[str, Any], states: list[Payload], payload: Payload
    ) -> tuple[torch.Tensor, torch.Tensor]:
        frozen = _frozen_layers(backbone, spec)
        if frozen is None:
            return super().encode_upper(backbone, spec, states, payload)
        stacked: dict[int, torch.Tensor] = {}
        for rows, _ in rows_by_length([len(state["hidden"]) for state in states]):
            hidden = torch.stack([states[i]["hidden"] for i in rows])
            for i, row in zip(rows, backbone.stack(backbone.upper_frames(hidden, frozen))):
                stacked[i] = row
        # The stacked slot vectors, right-padded with their mask: the default upper part's padding.
        return super().encode_upper(
            backbone, spec, [{"features": stacked[i]} for i in range(len(states))], payload
        )

    def row_inputs(self, spec: dict[str, Any], payload: Payload) -> list[Payload]:
        # A clip's outputs depend on its real frames only (see WhisperAudioEncoder.forward).
        return [
            {"input_features": features[:, : int(n)], "mel_lengths": n}
            for features, n in zip(payload["input_features"], payload["mel_lengths"])
        ]

    # --- building from a recipe ----------------------------------------------------------------------
    def load_backbone(self, recipe: EncoderRecipe) -> tuple[nn.Module, dict[str, Any], str | None]:
        settings, architecture = _split_recipe_config(recipe)
        if recipe.source == PACKAGED_WHISPER:
            if architecture:
                raise MetaLMConfigError(
                    f"encoder {recipe.name!r}: {PACKAGED_WHISPER} takes only {sorted(RECIPE_SETTINGS)} in "
                    f"'config', got {sorted(architecture)}"
                )
            backbone = WhisperAudioEncoder(whisper_encoder_config(WHISPER_TINY_EN), settings["frame_stack"])
            backbone.whisper = load_packaged_whisper_encoder()
            folder = None
        elif recipe.source == "config":
            try:
                config = whisper_encoder_config({**WHISPER_TINY_EN, **architecture})
            except ValueError as err:
                raise MetaLMConfigError(f"encoder {recipe.name!r}: 'config': {err}") from None
            backbone, folder = WhisperAudioEncoder(config, settings["frame_stack"]), None
        else:  # an HF Whisper folder or hub id: its encoder
            from transformers import WhisperModel

            from metalm.model.packaged import resolve_source

            folder = resolve_source(recipe.source)
            whisper = WhisperModel.from_pretrained(folder).get_encoder()
            backbone = WhisperAudioEncoder(whisper.config, settings["frame_stack"])
            backbone.whisper = whisper
        return backbone, {"backbone": WHISPER, "config": encoder_fields(backbone.config)}, folder

    def complete_spec(
        self,
        recipe: EncoderRecipe,
        spec: dict[str, Any],
        backbone: nn.Module,
        folder: str | None,
        decoder_tokenizer: Any,
    ) -> WhisperFeatureExtractor:
        spec.update(_split_recipe_config(recipe)[0])
        return feature_extractor(spec)

    def probe_part(self, spec: dict[str, Any]) -> AudioInput:
        return AudioInput(probe_audio(), encoder=spec["name"])

    # --- the feature extractor (rebuilt from the spec; nothing to save) -------------------------------
    def default_preprocessor(self, spec: dict[str, Any]) -> WhisperFeatureExtractor:
        return feature_extractor(spec)

    def part(self, value: Any, encoder: str | None = None) -> AudioInput:
        return AudioInput(value, encoder=encoder)

    def describe_part(self, part: AudioInput, max_chars: int = 80) -> str:
        return f"<audio:{source_name(part.audio)}>"

    def segment(
        self, processor: Processor, part: AudioInput, where: str, cache: LogMelCache | None = None
    ) -> EncodedSegment:
        name = processor.encoder_for(self.kind, part.encoder, where)
        spec = processor.config.encoder_spec(name)
        extractor = processor.preprocessors[name]
        try:
            if cache is not None and isinstance(part.audio, str) and part.sampling_rate is None:
                features = cache.get(part.audio, extractor, spec["max_seconds"])
            else:
                samples = load_audio(
                    part.audio, sampling_rate=part.sampling_rate, name=where, max_seconds=spec["max_seconds"]
                )
                features = log_mel(extractor, samples)
        except AudioError as err:
            raise InputError(str(err)) from err
        if part.transcript:
            return EncodedSegment(name, payload=features, target_ids=list(part.transcript), loss=False)
        return EncodedSegment(name, payload=features)

    def new_cache(self, max_bytes: int) -> LogMelCache:
        return LogMelCache(max_bytes)

    # --- collation -------------------------------------------------------------------------------------
    def payload_size(self, seg: EncodedSegment) -> int | None:
        return None if seg.payload is None else int(seg.payload.shape[-1])

    def check_segment(self, spec: dict[str, Any], seg: EncodedSegment, where: str) -> None:
        mels = spec["config"]["num_mel_bins"]
        features = seg.payload
        if not isinstance(features, torch.Tensor) or features.ndim != 2 or features.shape[0] != mels:
            shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
            raise SampleError(
                f"{where}: audio encoder {seg.encoder!r} needs log-mel features [{mels}, T], got {shape}"
            )
        longest = int(spec["max_seconds"] * MEL_FRAMES_PER_SECOND)
        if not 0 < features.shape[1] <= longest:
            raise SampleError(
                f"{where}: {features.shape[1]} mel frames; audio encoder {seg.encoder!r} takes 1 to {longest}"
            )

    def collate(self, spec: dict[str, Any], segments: list[EncodedSegment]) -> Payload:
        lengths = [int(seg.payload.shape[1]) for seg in segments]
        mels = segments[0].payload.shape[0]
        # Padding is never encoded (each clip runs on its own frames); Whisper's silence level fills it.
        features = torch.empty(len(segments), mels, max(lengths))
        for i, seg in enumerate(segments):
            features[i].fill_(float(seg.payload.max()) - 2.0)
            features[i, :, : lengths[i]] = seg.payload
        return {"input_features": features, "mel_lengths": torch.tensor(lengths)}

    def filler(self, spec: dict[str, Any], preprocessor: Any) -> EncodedSegment:
        mels = spec["config"]["num_mel_bins"]
        return EncodedSegment(spec["name"], payload=torch.full((mels, 10), -1.5), loss=False)


def _frozen_layers(backbone: nn.Module, spec: dict[str, Any]) -> int | None:
    """How many of Whisper's layers stay frozen below trainable ones; None when the encoder does not split
    (all of it trains, or none of it: `trainable_layers` 0 freezes the whole backbone, the default path)."""
    trainable = spec.get("trainable_layers")
    layers = len(backbone.layer_groups()) if hasattr(backbone, "layer_groups") else 0
    if trainable is None or trainable == 0 or trainable >= layers:
        return None
    return layers - trainable


def _split_recipe_config(recipe: EncoderRecipe) -> tuple[dict[str, Any], dict[str, Any]]:
    """(audio settings with their defaults, the rest: a Whisper architecture) of a recipe's `config`."""
    given = dict(recipe.config or {})
    settings = {key: given.pop(key, default) for key, default in RECIPE_SETTINGS.items()}
    return settings, given


register_modality(AudioModality())


class LogMelCache:
    """Log-mel features of audio references (paths, data URLs) for training, which reads every clip once
    per epoch: kept as float16 (the rounding is far below a 16-bit recording's own) until `max_bytes`
    are held, then computed afresh without evicting."""

    def __init__(self, max_bytes: int = 512 << 20) -> None:
        self.max_bytes, self.bytes = max_bytes, 0
        self._cache: dict[tuple[str, int], torch.Tensor] = {}

    def get(self, ref: str, extractor: WhisperFeatureExtractor, max_seconds: float) -> torch.Tensor:
        """[n_mels, T] float32 features of the clip `ref`; raises `AudioError` naming it."""
        key = (ref, extractor.feature_size)
        cached = self._cache.get(key)
        if cached is not None:
            return cached.float()
        name = "data URL" if ref[:5].lower() == "data:" else ref
        features = log_mel(extractor, load_audio(ref, name=name, max_seconds=max_seconds))
        half = features.half()
        if self.bytes + half.numel() * 2 <= self.max_bytes:
            self._cache[key] = half
            self.bytes += half.numel() * 2
        return half.float()
