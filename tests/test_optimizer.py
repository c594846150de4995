"""The optimizer the trainer builds: fused AdamW where the kernel applies, the same updates as the default."""

from __future__ import annotations

import torch

from metalm.training.config import OptimConfig
from metalm.training.optimizer import build_optimizer


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 4))
    model[0].weight.requires_grad_(False)  # frozen parameters stay out of the optimizer
    return model


def test_fused_adamw_on_plain_cpu_parameters_matches_the_default():
    optim = OptimConfig(lr=1e-2, weight_decay=0.1)
    fused_model, plain_model = _model(), _model()
    fused = build_optimizer(fused_model, optim)
    assert fused.defaults["fused"] is True
    assert all(p.requires_grad for g in fused.param_groups for p in g["params"])
    plain = torch.optim.AdamW(
        [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in build_optimizer(plain_model, optim).param_groups],
        lr=optim.lr, betas=optim.betas, eps=optim.eps, fused=False,
    )  # fmt: skip
    x = torch.randn(32, 8)
    for model, opt in ((fused_model, fused), (plain_model, plain)):
        for _ in range(5):
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            opt.step()
    for a, b in zip(fused_model.parameters(), plain_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_parameters_on_two_devices_keep_the_default_implementation():
    model = _model()
    model[2].to("meta")
    opt = build_optimizer(model, OptimConfig())
    assert not opt.defaults["fused"]
