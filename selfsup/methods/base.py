"""The Method interface: one nn.Module per algorithm that owns its backbone, heads and state.

The engine only calls `forward(batch) -> StepOutput`, `after_step(progress)`, `after_epoch(epoch)` and exports
`encoder`; everything else about a method stays inside its own file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch
from torch import nn


@dataclass
class StepOutput:
    loss: torch.Tensor  # scalar to back-propagate
    metrics: dict[str, Any] = field(default_factory=dict)  # logged as floats at log steps only


@dataclass
class MethodConfig:
    name: str = ""


class Method(nn.Module):
    """Base class: subclasses set `views`, `Config`, and `self.encoder` (the exported backbone)."""

    views: ClassVar[str] = "simclr"  # name of the augmentation preset the method trains on
    Config: ClassVar[type] = MethodConfig
    encoder: nn.Module

    @classmethod
    def optim_defaults(cls, cfg: Any, backbone_name: str, backbone_kwargs: dict[str, Any]) -> dict[str, Any]:
        """The paper's optimizer for this method and backbone (optim keys: name, lr per 256 images,
        weight_decay, betas ...), used when a pretraining config names no `optim.name`; keys the config
        does set win. Default: none (OptimConfig's own defaults, SGD).
        """
        return {}

    @classmethod
    def encoder_key(cls, cfg: Any) -> str:
        """The submodule that holds the exported encoder, as named in this method's state dict (so in its
        checkpoints): `encoder`, unless `encoder` is a property choosing among submodules (DINO, iBOT)."""
        return "encoder"

    def forward(self, batch: Any) -> StepOutput:  # batch: (views: list[Tensor [B, C, H, W]], labels [B])
        raise NotImplementedError

    def after_step(self, progress: float) -> None:
        """Called after every optimizer step with progress = step / total_steps in [0, 1]."""

    def on_fit_start(self, step: int, total_steps: int, steps_per_epoch: int) -> None:
        """Called by the engine before the first forward, after any resume: `step` updates are done of
        `total_steps`, an epoch is `steps_per_epoch` updates. For schedules a method keeps in epochs (DINO's
        teacher temperature, its last-layer freeze); default: nothing."""

    def after_epoch(self, epoch: int) -> None:
        """Called at the end of every full epoch with the number of epochs completed (e.g. to take a snapshot)."""

    def backbone_passes(self, views: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The backbone work one step of this method makes: (views forwarded with backward, views
        forwarded without gradient, e.g. through a momentum encoder). tools/benchmark.py times the bare
        backbone on exactly these, so `step / bare` is the cost of everything that is not the backbone.
        Default: every view, with backward.
        """
        return list(views), []

    def view_transform(self, transform: Callable) -> Callable:
        """Lets a method add per-sample work to the data pipeline (e.g. SimMIM's mask); default: none."""
        return transform

    def reconstruct(self, images: torch.Tensor) -> dict[str, torch.Tensor] | None:
        """Masked image models: {original, masked, reconstruction} [N, C, H, W] in the input's
        (normalised) pixel space, for the run's PNG grids; None: the method does not reconstruct.
        """
        return None

    def no_weight_decay(self) -> set[str]:
        """Parameter names exempt from weight decay beyond biases and norms (timm's convention)."""
        names: set[str] = set()
        for prefix, module in self.named_modules():
            if module is not self and hasattr(module, "no_weight_decay"):
                names |= {f"{prefix}.{n}" for n in module.no_weight_decay()}
        return names
