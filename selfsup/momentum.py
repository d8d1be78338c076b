"""Momentum (EMA) copies of a network: MoCo's key encoder, and any EMA teacher after it.

`momentum_update` does `theta_t <- m * theta_t + (1 - m) * theta_o` (MoCo Eq. 2) in place with one
`torch._foreach_lerp_` over all parameters, no Python arithmetic per parameter. Written by hand
because timm's `ModelEmaV3` owns its copy (a separate module outside the method's state dict) and
averages a whole state dict, while a method here keeps the copy as its own submodule and checkpoints it.

Buffer policy (`buffers=`), e.g. BatchNorm running statistics, which are not learned by gradient:
- "average" (default): floating buffers follow the same EMA as the parameters, integer buffers
  (`num_batches_tracked`) are copied, so the copy's whole state is an EMA of the online one (timm's
  ModelEma policy). The copy's own train-mode forwards still update its running stats in between.
- "copy": every buffer is copied from the online network after each update.
- "keep": buffers are left alone; the copy keeps the statistics of its own forward passes (what the
  MoCo reference code ends up with, since it averages `parameters()` only).
In train mode BatchNorm normalises with batch statistics, so the policy only matters where the
copy runs in eval mode (e.g. a teacher evaluated or used for targets in eval mode).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable

import torch
from timm.layers import DropPath
from torch import Tensor, nn
from torchvision.ops import StochasticDepth

__all__ = ["BUFFER_POLICIES", "momentum_copy", "momentum_update", "cosine_momentum"]

BUFFER_POLICIES = ("average", "copy", "keep")


def momentum_copy(online: nn.Module, *, stochastic: bool = True) -> nn.Module:
    """A frozen deep copy of `online` to start the EMA from (theta_t = theta_o at step 0, MoCo Alg. 1).

    `stochastic=False`: the copy's stochastic depth and dropout are off (a deterministic teacher, as DINO and
    iBOT build theirs); they hold no parameters or buffers, so the EMA pairs the same tensors either way.
    """
    target = copy.deepcopy(online)
    target.requires_grad_(False)  # never receives gradients; optimizers built from requires_grad skip it
    if not stochastic:
        for module in target.modules():
            if isinstance(module, DropPath):
                module.drop_prob = 0.0
            elif isinstance(module, StochasticDepth | nn.modules.dropout._DropoutNd):
                module.p = 0.0
    return target


def _as_modules(modules: nn.Module | Iterable[nn.Module]) -> list[nn.Module]:
    return [modules] if isinstance(modules, nn.Module) else list(modules)


def _tensors(modules: list[nn.Module], kind: str) -> list[Tensor]:
    # Rebuilt per call (microseconds): `.to(device)` replaces buffer objects, so a cached list would go stale.
    return [t for m in modules for t in (m.parameters() if kind == "params" else m.buffers())]


@torch.no_grad()
def momentum_update(
    online: nn.Module | Iterable[nn.Module],
    target: nn.Module | Iterable[nn.Module],
    momentum: float,
    *,
    buffers: str = "average",
) -> None:
    """In place: `target <- momentum * target + (1 - momentum) * online` for every parameter.

    `online` / `target` are modules (or equal-length sequences of modules, e.g. backbone and head)
    of the same architecture, matched in `parameters()` / `buffers()` order. See the module
    docstring for the buffer policy.
    """
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must lie in [0, 1], got {momentum}")
    if buffers not in BUFFER_POLICIES:
        raise ValueError(f"buffers must be one of {', '.join(BUFFER_POLICIES)}, got {buffers!r}")
    online, target = _as_modules(online), _as_modules(target)
    online_params, target_params = _tensors(online, "params"), _tensors(target, "params")
    if len(online_params) != len(target_params):
        raise ValueError(
            f"online and target networks differ: {len(online_params)} vs {len(target_params)} parameters; "
            "the target must be a copy of the online network (momentum_copy)"
        )
    if online_params:
        # lerp(t, o, 1 - m) = t + (1 - m)(o - t) = m t + (1 - m) o, one fused call for all parameters
        torch._foreach_lerp_(target_params, online_params, 1.0 - momentum)

    if buffers == "keep":
        return
    online_bufs, target_bufs = _tensors(online, "buffers"), _tensors(target, "buffers")
    if len(online_bufs) != len(target_bufs):
        raise ValueError(f"online and target networks differ: {len(online_bufs)} vs {len(target_bufs)} buffers")
    floating = [i for i, b in enumerate(target_bufs) if b.is_floating_point()]
    if buffers == "average" and floating:
        torch._foreach_lerp_([target_bufs[i] for i in floating], [online_bufs[i] for i in floating], 1.0 - momentum)
        copied = [i for i, b in enumerate(target_bufs) if not b.is_floating_point()]
    else:
        copied = list(range(len(target_bufs)))
    if copied:
        torch._foreach_copy_([target_bufs[i] for i in copied], [online_bufs[i] for i in copied])


def cosine_momentum(progress: float, base: float) -> float:
    """BYOL's schedule (Grill et al. 2020, Sec. 3.2), used by MoCo v3: m = 1 - (1 - m0)(cos(pi p) + 1) / 2.

    Rises from `base` at progress 0 to 1 at progress 1.
    """
    progress = min(max(progress, 0.0), 1.0)
    return 1.0 - (1.0 - base) * (math.cos(math.pi * progress) + 1.0) / 2.0
