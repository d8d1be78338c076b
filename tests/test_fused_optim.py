"""optim.fused: torch's fused update kernels give the same update as the default implementation."""

import copy

import pytest
import torch
from torch import nn

from selfsup.config import ConfigError, OptimConfig
from selfsup.optim import build_optimizer


@pytest.mark.parametrize("name", ["sgd", "nesterov", "adamw"])
def test_fused_update_equals_the_default_one(name):
    torch.manual_seed(0)
    # no bias right before a BatchNorm: its gradient is rounding noise, which Adam scales up to lr-sized steps
    model = nn.Sequential(nn.Linear(6, 8, bias=False), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3))
    twin = copy.deepcopy(model)
    x = torch.randn(16, 6)
    fused = build_optimizer(model, OptimConfig(name=name, fused=True, weight_decay=0.1), lr=0.05)
    plain = build_optimizer(twin, OptimConfig(name=name, weight_decay=0.1), lr=0.05)
    assert all(g["fused"] for g in fused.param_groups) and not any(g.get("fused") for g in plain.param_groups)
    for _ in range(3):
        for m, opt in ((model, fused), (twin, plain)):
            opt.zero_grad()
            m(x).square().mean().backward()
            opt.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_fused_needs_an_optimizer_that_has_it():
    with pytest.raises(ConfigError, match="optim.fused"):
        build_optimizer(nn.Linear(2, 2), OptimConfig(name="lars", fused=True), lr=0.1)
