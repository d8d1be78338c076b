"""Stochastic weight averaging (Izmailov et al. 2018) for fine-tuning, on torch.optim.swa_utils.

torch supplies the average (`AveragedModel`: the running arithmetic mean of the snapshots, Eq. 1 of the paper)
and the BatchNorm pass (`update_bn`: one forward pass over the training data in train mode, cumulative
statistics). Written here: the SWA learning rate as a function of the update count. torch's `SWALR` keeps its
position in its own (unsaved) state, is stepped once per epoch and has no cyclic form, while the engine sets
the lr of every update from the update count alone so that a resumed run gets the same rates; `SWASchedule`
gives SWALR's cosine anneal to a constant rate, or the paper's cyclic rate (Sec. 3.2, Eq. 2) with one cycle
per epoch, so each snapshot is taken where the cycle's rate is lowest.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Iterator

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, update_bn

__all__ = ["SWA_SCHEDULES", "SWASchedule", "swa_learning_rate", "make_swa_model", "recompute_batch_norm"]

SWA_SCHEDULES = ("constant", "cyclic")


def swa_learning_rate(
    update: int, *, start_update: int, steps_per_epoch: int, start_lr: float, peak_lr: float, swa_lr: float,
    anneal_steps: int, mode: str,
) -> float:
    """The lr of optimizer update number `update` (1-based) inside the SWA phase, which begins after `start_update`.

    constant: cosine from `start_lr` (the schedule's rate where SWA starts) to `swa_lr` over `anneal_steps`
    updates, then `swa_lr` (SWALR with anneal_strategy="cos"). cyclic: within each epoch-long cycle of c updates,
    linearly from alpha1 = `peak_lr` down to alpha2 = `swa_lr`: alpha(i) = (1 - t(i)) alpha1 + t(i) alpha2 with
    t(i) = (mod(i - 1, c) + 1) / c (Izmailov et al. Eq. 2), so the update that ends an epoch runs at alpha2.
    """
    index = update - start_update - 1  # 0-based position of this update in the SWA phase
    if index < 0:
        raise ValueError(f"update {update} is before the SWA phase (starts after update {start_update})")
    if mode == "cyclic":
        t = (index % steps_per_epoch + 1) / steps_per_epoch
        return (1 - t) * peak_lr + t * swa_lr
    if mode != "constant":
        raise ValueError(f"SWA schedule {mode!r} is not one of {SWA_SCHEDULES}")
    if anneal_steps <= 0:
        return swa_lr
    alpha = (1 - math.cos(math.pi * min(1.0, (index + 1) / anneal_steps))) / 2
    return (1 - alpha) * start_lr + alpha * swa_lr


class SWASchedule:
    """The engine's scheduler (timm warmup-cosine) until epoch `start_epoch`, then SWA's rate; like timm, each
    parameter group gets the rate times its `lr_scale` (layer decay, discriminative fine-tuning)."""

    def __init__(self, base: Any, steps_per_epoch: int, *, start_epoch: int, swa_lr: float, mode: str = "constant",
                 anneal_epochs: float = 1.0) -> None:
        if mode not in SWA_SCHEDULES:
            raise ValueError(f"SWA schedule {mode!r} is not one of {SWA_SCHEDULES}")
        self.base, self.optimizer = base, base.optimizer
        self.kwargs = dict(start_update=start_epoch * steps_per_epoch, steps_per_epoch=steps_per_epoch,
                           peak_lr=float(base.base_values[0]), swa_lr=swa_lr,
                           anneal_steps=round(anneal_epochs * steps_per_epoch), mode=mode)
        base.step_update(self.kwargs["start_update"] + 1)  # the rate the base schedule would give where SWA starts
        first = self.optimizer.param_groups[0]
        self.kwargs["start_lr"] = first["lr"] / first.get("lr_scale", 1.0)

    def step_update(self, num_updates: int, metric: Any = None) -> None:
        if num_updates <= self.kwargs["start_update"]:
            self.base.step_update(num_updates, metric)
            return
        lr = swa_learning_rate(num_updates, **self.kwargs)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)


def make_swa_model(model: nn.Module) -> AveragedModel:
    """An equal-weight running average of `model`'s parameters; its BatchNorm buffers are not averaged but
    recomputed (`recompute_batch_norm`) before it is evaluated, as in the paper."""
    swa = AveragedModel(model, use_buffers=False)
    swa.requires_grad_(False)  # not trained, not in the optimizer, not synced by DDP
    return swa.eval()


def recompute_batch_norm(model: nn.Module, batches: Iterable[Any], device: torch.device | str) -> None:
    """BatchNorm running statistics of `model` recomputed over `batches` of (images or [views], labels)."""
    update_bn(_images(batches), model, device=torch.device(device))


def _images(batches: Iterable[Any]) -> Iterator[torch.Tensor]:
    for batch in batches:
        images = batch[0] if isinstance(batch, (list, tuple)) else batch
        while isinstance(images, (list, tuple)):  # one view from the MultiView transform
            images = images[0]
        yield images
