"""The MLP connector's optional input standardisation (``connector: {type: mlp, input_norm: batch}``)."""

from __future__ import annotations

import torch

from metalm.model.connectors import MLPConnector, build_connector


def test_input_norm_centres_real_vectors_and_ignores_padding():
    torch.manual_seed(0)
    conn = MLPConnector(6, 4, input_norm="batch").train()
    feats = torch.randn(3, 5, 6) + 10.0  # a large shared offset, as post-ReLU CNN features have
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[2, 3:] = False
    feats[~mask] = 1e6  # padding must not move the statistics
    out, out_mask = conn(feats, mask)
    assert out.shape == (3, 5, 4) and torch.equal(out_mask, mask)
    assert conn.input_norm.running_mean.abs().max() < 2.0  # 0.1 * ~10 per step: padding would add 1e5
    conn(feats[:1, :1], mask[:1, :1])  # a single vector uses the running statistics
    conn.eval()
    assert torch.isfinite(conn(feats, mask)[0]).all()


def test_build_connector_reads_input_norm():
    assert build_connector({"type": "mlp", "input_norm": "batch"}, 8, 4).input_norm is not None
    assert build_connector({"type": "mlp"}, 8, 4).input_norm is None
