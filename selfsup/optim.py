"""Optimizer, parameter groups and the warmup-cosine schedule, from timm where it matches the papers.

timm's `create_optimizer_v2` already does what the papers ask for: SGD / AdamW / LAMB, no weight
decay on biases, norms and the model's `no_weight_decay()` names, and layer-wise lr decay from the
model's `group_matcher`. We add the batch-size lr scaling and step-based schedule, and two names
whose meaning differs from timm's:

- `sgd` is plain momentum SGD as in the papers (MoCo v2, SimCLR's linear evaluation); timm's `sgd`
  is Nesterov, which is offered here as `nesterov`.
- `lars` is the LARS of MoCo v3 / MAE, written here by hand (`LARS` below) because timm's `Lars`
  adapts a weight only when its group has weight decay: with weight decay 0 (the linear probe) it
  silently becomes plain SGD. Parameter groups still come from timm's factory.
"""

from __future__ import annotations

import math

import torch
from timm.optim import OptimInfo, OptimizerRegistry, create_optimizer_v2
from timm.scheduler import CosineLRScheduler, MultiStepLRScheduler
from torch import nn

from selfsup.config import ConfigError, OptimConfig


FUSED = ("sgd", "nesterov", "adam", "adamw")  # torch.optim classes with fused=True
TIMM_NAMES = {"sgd": "momentum"}  # our name -> timm's, where they differ (timm's "sgd" is Nesterov)


class LARS(torch.optim.Optimizer):
    """LARS (You et al. 2017) as MoCo v3 and MAE run it (facebookresearch/mae util/lars.py, lines 31-47
    at 6a2ba40): a weight with ndim > 1 steps along d = g + wd * w scaled by the trust ratio
    eta * ||w|| / ||d||, whatever its weight decay; biases and norms (ndim <= 1) take the plain
    momentum step on g, with neither decay nor adaptation. Momentum: buf = m * buf + d, w -= lr * buf.
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 trust_coefficient: float = 1e-3) -> None:
        defaults = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay, "trust_coefficient": trust_coefficient}
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if p.ndim > 1:
                    d = d.add(p, alpha=group["weight_decay"])
                    w_norm, d_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(d)
                    # ratio 1 where either norm is 0 (a zero-initialised weight, an unused one)
                    ratio = torch.where((w_norm > 0) & (d_norm > 0), group["trust_coefficient"] * w_norm / d_norm, 1.0)
                    d = d.mul(ratio)
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = d.clone()  # m * 0 + d
                else:
                    state["momentum_buffer"].mul_(group["momentum"]).add_(d)
                p.add_(state["momentum_buffer"], alpha=-group["lr"])
        return loss


# A private timm registry holding only our LARS: its parameter groups are built by timm's own factory
# (no decay on no_weight_decay() names, layer decay) without touching timm's global registry.
LARS_REGISTRY = OptimizerRegistry()
LARS_REGISTRY.register(OptimInfo(name="lars", opt_class=LARS, description="LARS as in MoCo v3 / MAE", has_momentum=True))


@torch.no_grad()
def clip_grad_per_parameter_(parameters, max_norm: float) -> None:
    """Each gradient scaled on its own to an L2 norm of at most `max_norm`: g <- g * min(1, max_norm / (|g| + 1e-6)),
    the clipping of DINO and iBOT (facebookresearch/dino utils.py L132-141), in two fused calls."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return
    norms = torch.stack(torch._foreach_norm(grads))
    scales = (max_norm / (norms + 1e-6)).clamp_(max=1.0)
    torch._foreach_mul_(grads, list(scales.unbind()))


def scaled_lr(cfg: OptimConfig, global_batch_size: int) -> float:
    """The papers' rule: lr = base_lr x global_batch / 256 (linear; sqrt for LARS with small batches)."""
    if cfg.lr_scaling == "linear":
        return cfg.lr * global_batch_size / 256
    if cfg.lr_scaling == "sqrt":
        return cfg.lr * math.sqrt(global_batch_size / 256)
    if cfg.lr_scaling == "none":
        return cfg.lr
    raise ConfigError(f"optim.lr_scaling must be linear, sqrt or none, got {cfg.lr_scaling!r}.")


def build_optimizer(model: nn.Module | list[dict], cfg: OptimConfig, lr: float) -> torch.optim.Optimizer:
    """timm optimizer over the trainable parameters; frozen ones (requires_grad=False) are left out.

    `model` may also be ready-made parameter groups (each with its weight_decay, maybe an lr_scale).
    """
    kwargs = {}
    name = cfg.name.lower()
    if name in ("adamw", "adam", "lamb", "nadamw", "adan"):
        kwargs["betas"] = tuple(cfg.betas)
    if cfg.fused:
        if name not in FUSED:
            raise ConfigError(f"optim.fused=true needs an optimizer with fused kernels ({', '.join(FUSED)}), "
                              f"not {cfg.name!r}; set optim.fused=false.")
        kwargs["fused"] = True
    common = dict(lr=lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum, layer_decay=cfg.layer_decay, **kwargs)
    try:
        if name == "lars":
            optimizer = LARS_REGISTRY.create_optimizer(model, opt="lars", weight_decay_exclude_1d=cfg.exclude_bias_and_norm, **common)
        else:
            optimizer = create_optimizer_v2(model, opt=TIMM_NAMES.get(name, name), filter_bias_and_bn=cfg.exclude_bias_and_norm, **common)
    except (AssertionError, ValueError) as e:
        if "not found in registry" in str(e) or "Invalid optimizer" in str(e):
            raise ConfigError(f"optim.name {cfg.name!r} is not an optimizer timm knows: use sgd, nesterov, adamw, lars or lamb.") from e
        raise
    if cfg.bias_lr_scale is not None:
        split_1d_lr(optimizer, cfg.bias_lr_scale)
    return optimizer


def split_1d_lr(optimizer: torch.optim.Optimizer, scale: float) -> None:
    """Move the 1-D parameters (biases, norms) of every group into a group of their own whose `lr_scale` is the
    group's times `scale` (Barlow Twins' param_biases group, facebookresearch/barlowtwins main.py L90-98). Call it
    before the first step: groups keep their other settings (weight decay, layer-decay scale), the schedulers apply
    `lr_scale` on top of the scheduled lr."""
    groups = []
    for group in optimizer.param_groups:
        settings = {k: v for k, v in group.items() if k != "params"}
        weights = [p for p in group["params"] if p.ndim > 1]
        biases = [p for p in group["params"] if p.ndim <= 1]
        if weights:
            groups.append({**settings, "params": weights})
        if biases:
            groups.append({**settings, "params": biases, "lr_scale": settings.get("lr_scale", 1.0) * scale})
    optimizer.param_groups.clear()
    for group in groups:
        optimizer.add_param_group(group)


STEP_DECAY = 0.1  # optim.schedule=step: lr x 0.1 per milestone (MoCo main_lincls.py adjust_learning_rate)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int, warmup_steps: int,
                    steps_per_epoch: int = 1):
    """Linear warmup from 0 over `warmup_steps`, then cosine to `min_lr` at `total_steps` (optim.schedule=cosine)
    or x 0.1 from each epoch of `optim.lr_milestones` on (step); stepped per update.

    The engine sets the lr of update u (0-based) with step_update(u + 1). timm's MultiStepLRScheduler counts
    milestone d once t + 1 >= d, so d = m x steps_per_epoch + 2 lowers the lr from the first update of epoch m on,
    as MoCo's per-epoch `lr *= 0.1 if epoch >= milestone`. timm applies each group's `lr_scale` on top.
    """
    warmup_steps = min(warmup_steps, max(total_steps - 1, 0))
    if cfg.schedule == "step":
        return MultiStepLRScheduler(
            optimizer,
            decay_t=[round(m * steps_per_epoch) + 2 for m in cfg.lr_milestones],
            decay_rate=STEP_DECAY,
            warmup_t=warmup_steps,
            warmup_lr_init=0.0,
            warmup_prefix=False,  # milestones count epochs from the start, warmup included
            t_in_epochs=False,
        )
    return CosineLRScheduler(
        optimizer,
        t_initial=max(total_steps - warmup_steps, 1),
        lr_min=cfg.min_lr,
        warmup_t=warmup_steps,
        warmup_lr_init=0.0,
        warmup_prefix=True,
        t_in_epochs=False,
    )


def weight_decay_at(cfg: OptimConfig, step: int, total_steps: int) -> float:
    """The weight decay of update `step` (0-based): cosine from `weight_decay` to `weight_decay_end` over the run,
    without warmup (facebookresearch/dino utils.py cosine_scheduler, as main_dino.py builds wd_schedule)."""
    if cfg.weight_decay_end is None:
        return cfg.weight_decay
    progress = min(max(step / max(total_steps, 1), 0.0), 1.0)
    return cfg.weight_decay_end + 0.5 * (cfg.weight_decay - cfg.weight_decay_end) * (1.0 + math.cos(math.pi * progress))


def set_weight_decay(optimizer: torch.optim.Optimizer, cfg: OptimConfig, step: int, total_steps: int) -> None:
    """Apply `weight_decay_at` to the decayed parameter groups (those built with weight decay > 0; biases, norms and
    `no_weight_decay()` names stay at 0). Nothing to do for a constant weight decay."""
    if cfg.weight_decay_end is None:
        return
    value = weight_decay_at(cfg, step, total_steps)
    for group in optimizer.param_groups:
        if group.setdefault("scheduled_weight_decay", group["weight_decay"] > 0):  # fixed at the first call
            group["weight_decay"] = value
