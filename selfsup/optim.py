"""Optimizer, parameter groups and the warmup-cosine schedule, all from timm.

timm's `create_optimizer_v2` already does what the papers ask for: SGD / AdamW / LARS / LAMB,
no weight decay on biases, norms and the model's `no_weight_decay()` names, and layer-wise lr
decay from the model's `group_matcher`. We add the batch-size lr scaling and step-based schedule.
"""

from __future__ import annotations

import math

import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from torch import nn

from selfsup.config import ConfigError, OptimConfig


FUSED = ("sgd", "adam", "adamw")  # torch.optim classes with fused=True


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
    try:
        return create_optimizer_v2(
            model,
            opt=name,
            lr=lr,
            weight_decay=cfg.weight_decay,
            momentum=cfg.momentum,
            filter_bias_and_bn=cfg.exclude_bias_and_norm,
            layer_decay=cfg.layer_decay,
            **kwargs,
        )
    except (AssertionError, ValueError) as e:
        if "not found in registry" in str(e) or "Invalid optimizer" in str(e):
            raise ConfigError(f"optim.name {cfg.name!r} is not an optimizer timm knows: use sgd, adamw, lars or lamb.") from e
        raise


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int, warmup_steps: int):
    """Linear warmup from 0 over `warmup_steps`, then cosine to `min_lr` at `total_steps`; stepped per update.

    timm applies each group's `lr_scale` (layer decay, discriminative lr) on top of the schedule.
    """
    warmup_steps = min(warmup_steps, max(total_steps - 1, 0))
    return CosineLRScheduler(
        optimizer,
        t_initial=max(total_steps - warmup_steps, 1),
        lr_min=cfg.min_lr,
        warmup_t=warmup_steps,
        warmup_lr_init=0.0,
        warmup_prefix=True,
        t_in_epochs=False,
    )
