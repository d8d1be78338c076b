"""selfsup.momentum: the EMA update against its formula, the buffer policies, the cosine schedule."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from timm.layers import DropPath
from torch import nn
from torch.testing import assert_close
from torchvision.ops import StochasticDepth

from selfsup.momentum import cosine_momentum, momentum_copy, momentum_update


def small_net() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3)).double()


def perturbed_pair(seed: int = 0) -> tuple[nn.Module, nn.Module]:
    """Online and target networks with different parameters and BN statistics."""
    torch.manual_seed(seed)
    online = small_net()
    target = momentum_copy(online)
    with torch.no_grad():
        for p in online.parameters():
            p.add_(torch.randn_like(p))
    online.train()(torch.randn(8, 4, dtype=torch.float64))  # online BN stats move, 1 batch tracked
    target.train()(torch.randn(8, 4, dtype=torch.float64) * 3)  # target's own forwards: other stats
    target(torch.randn(8, 4, dtype=torch.float64))  # 2 batches tracked
    return online, target


def test_momentum_copy_is_equal_and_frozen() -> None:
    online = small_net()
    target = momentum_copy(online)
    for (name, p), q in zip(online.named_parameters(), target.parameters()):
        assert torch.equal(p, q) and p.data_ptr() != q.data_ptr(), name
        assert p.requires_grad and not q.requires_grad


def test_a_deterministic_copy_drops_no_paths_and_no_units_while_the_online_network_still_does() -> None:
    torch.manual_seed(0)
    online = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), DropPath(0.5), StochasticDepth(0.5, "row"), nn.Linear(8, 3))
    teacher, plain = momentum_copy(online, stochastic=False), momentum_copy(online)
    x = torch.randn(16, 4)
    with torch.no_grad():
        assert torch.equal(teacher.train()(x), teacher(x))  # train mode, nothing random left
        assert not torch.equal(online.train()(x), online(x))
        assert not torch.equal(plain.train()(x), plain(x))  # the default copy keeps the online network's noise
        assert torch.equal(teacher(x), online.eval()(x))  # = the online network with its noise off
    assert [n for n, _ in teacher.named_parameters()] == [n for n, _ in online.named_parameters()]  # EMA pairs


@pytest.mark.parametrize("policy", ["average", "copy", "keep"])
def test_update_follows_the_formula_for_every_parameter_and_the_buffer_policy(policy: str) -> None:
    online, target = perturbed_pair()
    m = 0.9
    before_t = {k: v.clone() for k, v in target.state_dict().items()}
    online_state = {k: v.clone() for k, v in online.state_dict().items()}
    param_names = {name for name, _ in online.named_parameters()}

    momentum_update(online, target, m, buffers=policy)

    after = target.state_dict()
    assert set(after) == set(online_state)
    for name, value in after.items():
        t, o = before_t[name], online_state[name]
        if name in param_names:
            expected = m * t + (1 - m) * o  # MoCo Eq. 2
        elif policy == "keep":
            expected = t
        elif policy == "copy" or not value.is_floating_point():  # num_batches_tracked: copied
            expected = o
        else:
            expected = m * t + (1 - m) * o
        assert_close(value, expected, rtol=1e-12, atol=1e-12, msg=f"{policy}: {name}")
    assert torch.equal(online.state_dict()["1.running_mean"], online_state["1.running_mean"])  # online untouched


def test_momentum_one_freezes_and_zero_copies() -> None:
    online, target = perturbed_pair()
    before = copy.deepcopy(target.state_dict())
    momentum_update(online, target, 1.0, buffers="keep")
    for name, value in target.state_dict().items():
        assert torch.equal(value, before[name]), name
    momentum_update(online, target, 0.0, buffers="copy")
    for name, value in target.state_dict().items():
        assert torch.equal(value, online.state_dict()[name]), name


def test_update_accepts_module_lists_and_is_one_fused_call(monkeypatch) -> None:
    """Backbone + head in one call; all parameters go through one _foreach_lerp_ (no per-parameter loop)."""
    torch.manual_seed(1)
    a_online, b_online = nn.Linear(3, 5), nn.Linear(5, 2)
    a_target, b_target = momentum_copy(a_online), momentum_copy(b_online)
    with torch.no_grad():
        for p in [*a_online.parameters(), *b_online.parameters()]:
            p.add_(1.0)
    expected = [0.5 * t + 0.5 * o for t, o in zip([*a_target.parameters(), *b_target.parameters()],
                                                   [*a_online.parameters(), *b_online.parameters()])]
    calls = []
    real = torch._foreach_lerp_
    monkeypatch.setattr(torch, "_foreach_lerp_", lambda *args: (calls.append(len(args[0])), real(*args))[1])
    momentum_update([a_online, b_online], [a_target, b_target], 0.5, buffers="keep")
    assert calls == [4]  # 2 weights + 2 biases in a single fused update
    for got, want in zip([*a_target.parameters(), *b_target.parameters()], expected):
        assert_close(got, want)


def test_target_never_receives_gradients() -> None:
    online, target = perturbed_pair()
    (online(torch.randn(4, 4, dtype=torch.float64)).sum() + target(torch.randn(4, 4, dtype=torch.float64)).sum()).backward()
    assert all(p.grad is not None for p in online.parameters())
    assert all(p.grad is None for p in target.parameters())


def test_mismatched_networks_and_bad_arguments_are_rejected() -> None:
    with pytest.raises(ValueError, match="differ"):
        momentum_update(nn.Linear(2, 2), nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)), 0.9)
    with pytest.raises(ValueError, match="momentum"):
        momentum_update(nn.Linear(2, 2), nn.Linear(2, 2), 1.5)
    with pytest.raises(ValueError, match="buffers"):
        momentum_update(nn.Linear(2, 2), nn.Linear(2, 2), 0.9, buffers="mean")


def test_cosine_momentum_schedule() -> None:
    m0 = 0.99
    assert cosine_momentum(0.0, m0) == pytest.approx(m0)
    assert cosine_momentum(1.0, m0) == pytest.approx(1.0)
    assert cosine_momentum(0.5, m0) == pytest.approx(1 - (1 - m0) / 2)  # cos(pi/2) = 0
    for p in (0.1, 0.3, 0.77):  # closed form of BYOL Sec. 3.2
        assert cosine_momentum(p, m0) == pytest.approx(1 - (1 - m0) * (math.cos(math.pi * p) + 1) / 2)
    values = [cosine_momentum(i / 20, m0) for i in range(21)]
    assert all(a < b for a, b in zip(values, values[1:]))  # rises monotonically
    assert cosine_momentum(1.5, m0) == 1.0 and cosine_momentum(-0.5, m0) == pytest.approx(m0)  # clamped
