"""Connectors project an encoder's outputs to the decoder width (docs/method.md, Architecture)."""

from __future__ import annotations

import torch
from torch import nn


class SlotPositions(nn.Module):
    """A learned vector per slot index, added to a connector's outputs (`positions: learned`).

    A CNN's feature map carries no position of its own (DETR adds positional encodings to its CNN features
    for this reason); without one, the decoder tells an image's slots apart only by where they sit in the
    sequence, and a question about left and right stays at its majority answer (docs/own-data-icl.md).
    Zero at first, so a connector starts as it would without."""

    def __init__(self, num_slots: int, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_slots, dim))

    def forward(self, slots: torch.Tensor) -> torch.Tensor:
        if slots.shape[1] != self.weight.shape[0]:
            raise ValueError(
                f"connector positions: {self.weight.shape[0]} slots learned, {slots.shape[1]} given"
            )
        return slots + self.weight.to(slots.dtype)


class LinearConnector(nn.Module):
    """The paper's language connector: one linear projection per encoder output vector."""

    def __init__(self, in_dim: int, out_dim: int, num_positions: int | None = None) -> None:
        super().__init__()
        self.proj = nn.Linear(in_dim, out_dim)
        self.positions = SlotPositions(num_positions, out_dim) if num_positions else None

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.proj(features)
        return (out if self.positions is None else self.positions(out)), mask


class MLPConnector(nn.Module):
    """The paper's vision connector: a three-layer feed-forward network.

    ``input_norm="batch"`` standardises each input feature over the data first (BatchNorm without affine
    terms: running statistics at evaluation). A CNN's post-ReLU features share a large positive offset, so
    the differences between images (easy-VQA's colours: cosine 0.25 between a red and a blue square before
    the connector) are a small part of every vector, and the connector learnt to pass the offset and crush
    the rest (0.95-0.99 between colours after it); centred features put the differences up front."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        hidden_size: int | None = None,
        input_norm: str | None = None,
        num_positions: int | None = None,
    ) -> None:
        super().__init__()
        hidden = hidden_size or out_dim
        if input_norm not in (None, "batch"):
            raise ValueError(f"MLP connector input_norm must be 'batch' or null, got {input_norm!r}")
        self.input_norm = nn.BatchNorm1d(in_dim, affine=False) if input_norm == "batch" else None
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden),
            nn.GELU(),
            nn.Linear(hidden, hidden),
            nn.GELU(),
            nn.Linear(hidden, out_dim),
        )
        self.positions = SlotPositions(num_positions, out_dim) if num_positions else None

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.input_norm is not None:
            # Statistics over the real vectors only: padding must not shift the mean.
            real = features[mask]
            norm = self.input_norm
            # One vector has no batch statistics: it is standardised with the running ones.
            batch_stats = norm.training and real.shape[0] > 1
            normed = torch.zeros_like(features)
            normed[mask] = nn.functional.batch_norm(
                real,
                norm.running_mean,
                norm.running_var,
                training=batch_stats,
                momentum=norm.momentum,
                eps=norm.eps,
            )
            features = normed
        out = self.net(features)
        return (out if self.positions is None else self.positions(out)), mask


class _ResamplerLayer(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.norm_ff = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, queries: torch.Tensor, kv: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        # Queries attend to the inputs and to themselves (Flamingo's Perceiver resampler).
        q = self.norm_q(queries)
        keys = torch.cat([self.norm_kv(kv), q], dim=1)
        key_pad = torch.cat([pad, pad.new_zeros(q.shape[:2])], dim=1)
        queries = queries + self.attn(q, keys, keys, key_padding_mask=key_pad, need_weights=False)[0]
        return queries + self.ff(self.norm_ff(queries))


class ResamplerConnector(nn.Module):
    """K learned queries that cross-attend to the encoder outputs (as in Kosmos-1 / Flamingo)."""

    def __init__(self, in_dim: int, out_dim: int, num_queries: int, num_layers: int, num_heads: int) -> None:
        super().__init__()
        self.inp = nn.Linear(in_dim, out_dim)
        self.queries = nn.Parameter(torch.randn(num_queries, out_dim) * 0.02)
        self.layers = nn.ModuleList(_ResamplerLayer(out_dim, num_heads) for _ in range(num_layers))
        self.norm = nn.LayerNorm(out_dim)

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        kv = self.inp(features)
        queries = self.queries.unsqueeze(0).expand(features.shape[0], -1, -1)
        for layer in self.layers:
            queries = layer(queries, kv, ~mask)
        out = self.norm(queries)
        return out, torch.ones(out.shape[:2], dtype=torch.bool, device=out.device)


@torch.no_grad()
def fit_linear_connector(
    connector: nn.Module, features: torch.Tensor, targets: torch.Tensor, ridge: float = 1e-2
) -> float:
    """Set a linear connector to the ridge least-squares map from `features` [N, in] to `targets` [N, out]
    (solved in float64); returns the fit's R^2 on those rows. Other connector types raise ValueError."""
    if not isinstance(connector, LinearConnector):
        raise ValueError(
            f"only a linear connector can be fitted by least squares, not {type(connector).__name__}"
        )
    x = torch.cat([features.double(), features.new_ones(len(features), 1).double()], dim=1)
    y = targets.double()
    gram = x.T @ x + ridge * torch.eye(x.shape[1], dtype=x.dtype, device=x.device)
    solution = torch.linalg.solve(gram, x.T @ y)
    proj = connector.proj
    proj.weight.copy_(solution[:-1].T.to(proj.weight.dtype))
    proj.bias.copy_(solution[-1].to(proj.bias.dtype))
    residual = (x @ solution - y).pow(2).sum()
    return float(1 - residual / (y - y.mean(0)).pow(2).sum())


# Connector type -> builder(spec, in_dim, out_dim, num_positions); its keys are the types an encoder spec
# may name.
CONNECTORS = {
    "linear": lambda spec, in_dim, out_dim, positions: LinearConnector(in_dim, out_dim, positions),
    "mlp": lambda spec, in_dim, out_dim, positions: MLPConnector(
        in_dim, out_dim, spec.get("hidden_size"), spec.get("input_norm"), positions
    ),
    "resampler": lambda spec, in_dim, out_dim, positions: ResamplerConnector(
        in_dim, out_dim, spec["num_queries"], spec["num_layers"], spec["num_heads"]
    ),
}
CONNECTOR_TYPES = tuple(CONNECTORS)
# `positions` values: None (slots as the encoder gives them) or "learned" (`SlotPositions`).
POSITION_KINDS = (None, "learned")


def positions_problem(
    connector_type: str, positions: object, num_slots: int | None, slots_known: bool = True
) -> str | None:
    """Why a `connector_type` connector cannot take `positions` (None: it can). `num_slots`: the encoder's
    fixed number of output vectors, which learned positions need; a config checked before its encoder is
    built passes `slots_known=False`. The config check, `build_connector` and init_from's `connector_positions`
    all ask here, each naming the field in its own words."""
    if positions not in POSITION_KINDS:
        return f"must be 'learned' or null, got {positions!r}"
    if positions and connector_type == "resampler":
        return "a resampler's learned queries are its positions already"
    if positions and slots_known and not num_slots:
        return (
            "learned positions need an encoder with a fixed number of slots (a vision encoder); a text span "
            "or a clip of speech has as many as its input"
        )
    return None


def build_connector(spec: dict, in_dim: int, out_dim: int, num_slots: int | None = None) -> nn.Module:
    """Build the connector an encoder spec names. Each returns (features, valid_mask). `num_slots`: the
    encoder's fixed number of output vectors, which `positions: learned` needs."""
    if spec["type"] not in CONNECTORS:
        raise ValueError(f"unknown connector type {spec['type']!r}; one of {CONNECTOR_TYPES}")
    positions = spec.get("positions")
    problem = positions_problem(spec["type"], positions, num_slots)
    if problem:
        raise ValueError(f"connector positions: {problem}")
    return CONNECTORS[spec["type"]](spec, in_dim, out_dim, num_slots if positions else None)
