"""optim.name: each name gives the papers' update rule, checked against a hand-written closed form."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from selfsup.config import OptimConfig
from selfsup.optim import build_optimizer


def small_model() -> nn.Module:
    """Weights (ndim 2) next to biases and BatchNorm affines (ndim 1), as in a ResNet or a probe."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3))


def loss_of(model: nn.Module) -> torch.Tensor:
    x = torch.linspace(-2, 2, 16 * 6).view(16, 6)
    return (model(x) - 0.3).square().mean()


def run_steps(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int) -> None:
    for _ in range(steps):
        optimizer.zero_grad()
        loss_of(model).backward()
        optimizer.step()


def reference_steps(model: nn.Module, steps: int, update) -> nn.Module:
    """A copy of `model` moved by `update(name, w, g, buffers) -> new w`, with gradients from autograd."""
    model = copy.deepcopy(model)
    buffers: dict[str, torch.Tensor] = {}
    for _ in range(steps):
        model.zero_grad()
        loss_of(model).backward()
        with torch.no_grad():
            for name, w in model.named_parameters():
                w.copy_(update(name, w.detach().clone(), w.grad.clone(), buffers))
    return model


def assert_same_parameters(a: nn.Module, b: nn.Module) -> None:
    for (name, x), y in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-7, msg=name)


# ---------------------------------------------------------------------------------------------
# LARS as in MoCo v3 / MAE (facebookresearch/mae util/lars.py): every ndim > 1 weight is adapted
# whatever the weight decay; 1-D parameters get neither decay nor adaptation.


@pytest.mark.parametrize("weight_decay, exclude_bias_and_norm", [(0.0, True), (0.5, True), (0.5, False)])
def test_lars_two_steps_equal_the_closed_form(weight_decay, exclude_bias_and_norm):
    lr, momentum, eta = 0.8, 0.9, 1e-3

    def lars(name, w, g, buffers):
        if w.ndim > 1:
            d = g + weight_decay * w
            d = d * (eta * w.norm() / d.norm())  # trust ratio eta ||w|| / ||g + wd w||
        else:
            d = g  # biases and norms: plain momentum SGD
        buffers[name] = momentum * buffers[name] + d if name in buffers else d
        return w - lr * buffers[name]

    model = small_model()
    expected = reference_steps(model, 2, lars)
    cfg = OptimConfig(name="lars", weight_decay=weight_decay, momentum=momentum,
                      exclude_bias_and_norm=exclude_bias_and_norm)
    run_steps(model, build_optimizer(model, cfg, lr=lr), 2)
    assert_same_parameters(model, expected)


def test_lars_without_weight_decay_is_not_plain_sgd():
    """The linear probe runs LARS with weight decay 0: the step of a weight is eta ||w||-sized, not lr ||g||."""
    torch.manual_seed(0)
    probe = nn.Linear(512, 10)
    probe.weight.grad = torch.randn(10, 512)
    w0, g = probe.weight.detach().clone(), probe.weight.grad.clone()
    build_optimizer(probe, OptimConfig(name="lars", weight_decay=0.0), lr=0.1).step()
    step = (probe.weight.detach() - w0).norm()
    torch.testing.assert_close(step, 0.1 * 1e-3 * w0.norm())
    assert step < 0.01 * 0.1 * g.norm()


# ---------------------------------------------------------------------------------------------
# SGD: `sgd` is the papers' plain momentum SGD (MoCo v2, SimCLR linear eval); `nesterov` is its own name.


@pytest.mark.parametrize("name, nesterov", [("sgd", False), ("nesterov", True)])
def test_sgd_is_plain_momentum_and_nesterov_is_its_own_name(name, nesterov):
    lr, momentum, weight_decay = 0.5, 0.9, 0.1

    def sgd(name_, w, g, buffers):
        d = g + weight_decay * w if w.ndim > 1 else g  # timm's groups: no decay on biases and norms
        buffers[name_] = momentum * buffers[name_] + d if name_ in buffers else d
        return w - lr * (d + momentum * buffers[name_] if nesterov else buffers[name_])

    model = small_model()
    expected = reference_steps(model, 2, sgd)
    optimizer = build_optimizer(model, OptimConfig(name=name, weight_decay=weight_decay, momentum=momentum), lr=lr)
    assert [g["nesterov"] for g in optimizer.param_groups] == [nesterov] * len(optimizer.param_groups)
    run_steps(model, optimizer, 2)
    assert_same_parameters(model, expected)


@pytest.mark.parametrize("name", ["sgd", "lars"])
def test_bias_lr_scale_gives_1d_parameters_a_scaled_step(name):
    """Barlow Twins' recipe: biases and norms at lr x 0.024. First step of momentum SGD is w -= lr * g (closed form);
    LARS leaves 1-D parameters unadapted, so their first step is the same; the scheduler keeps the ratio."""
    from selfsup.optim import build_scheduler

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))
    cfg = OptimConfig(name=name, lr=0.5, momentum=0.9, weight_decay=0.0, warmup_epochs=0, bias_lr_scale=0.024)
    optimizer = build_optimizer(model, cfg, lr=0.5)
    scheduler = build_scheduler(optimizer, cfg, total_steps=10, warmup_steps=0)
    scheduler.step_update(1)
    scheduled = 0.5 * 0.5 * (1 + torch.cos(torch.tensor(torch.pi / 10))).item()
    before = copy.deepcopy(model.state_dict())
    model(torch.randn(8, 4)).square().sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    optimizer.step()
    for n, p in model.named_parameters():
        if p.ndim == 1:
            torch.testing.assert_close(p.detach(), before[n] - scheduled * 0.024 * grads[n], msg=n)
        elif name == "sgd":
            torch.testing.assert_close(p.detach(), before[n] - scheduled * grads[n], msg=n)
        else:  # LARS adapts the weight: not the bias' step, and not a x0.024 step
            assert not torch.allclose(p.detach(), before[n] - scheduled * 0.024 * grads[n])
    lrs = sorted({round(g["lr"] / scheduled, 6) for g in optimizer.param_groups})
    assert lrs == [0.024, 1.0]


def test_bias_lr_scale_must_be_positive():
    from selfsup.config import ConfigError

    with pytest.raises(ConfigError, match="optim.bias_lr_scale"):
        OptimConfig(bias_lr_scale=0.0)
