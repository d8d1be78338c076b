"""Supervised transfer on a pretrained backbone: the classifier, its parameter groups per fine-tuning
mode, and the supervised task the engine trains (fine-tuning and the linear probe share it).

timm supplies the pieces: layer-wise lr decay from the model's `group_matcher`
(`param_groups_layer_decay`, BEiT / MAE), the weight-decay groups, Mixup/CutMix, the soft-target and
smoothed cross-entropies and ModelEmaV3; its scheduler multiplies each group's lr by `lr_scale`.
Written here: the wrapper whose `group_matcher` lets timm's grouping see through backbone + head,
and the two-rate groups of discriminative fine-tuning.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.models._manipulate import MATCH_PREV_GROUP  # (99999,): "append to the previous group"
from timm.optim import param_groups_weight_decay
from timm.utils import ModelEmaV3
from torch import nn

from selfsup.averaging import make_swa_model
from selfsup.backbones import create_backbone
from selfsup.config import Config, ConfigError
from selfsup.methods.base import StepOutput
from selfsup.optim import build_optimizer

__all__ = ["LinearHead", "Classifier", "SupervisedTask", "build_finetune_optimizer", "with_drop_path"]


class LinearHead(nn.Module):
    """Linear classifier, optionally after a BatchNorm without affine parameters (MAE's linear probe)."""

    def __init__(self, in_dim: int, num_classes: int, *, batch_norm: bool = False, zero_init: bool = False) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(in_dim, affine=False, eps=1e-6) if batch_norm else nn.Identity()
        self.fc = nn.Linear(in_dim, num_classes)
        nn.init.normal_(self.fc.weight, std=0.0 if zero_init else 0.01)  # SimCLR's zero init; MoCo / MAE N(0, 0.01)
        nn.init.zeros_(self.fc.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(features))  # [B, D] -> logits [B, K]


# A `^` anchor (not a `[^...]` class or an escaped `\^`); timm matches with re.match, so anchors are redundant.
_ANCHOR = re.compile(r"(?<![\[\\])\^")


def _under(prefix: str, pattern: str) -> str:
    """The regex `pattern` (matched with re.match) re-rooted at `prefix.`."""
    return rf"{re.escape(prefix)}\.(?:{_ANCHOR.sub('', pattern)})"


def _without_tail(match: Any) -> Any:
    """A timm group spec without its tail entry: the final norm (or head conv) that timm appends to the last
    block with MATCH_PREV_GROUP and no index of its own. Left unmatched, it joins the classifier head at lr
    scale 1.0, as in MAE's `param_groups_lrd` (util/lr_decay.py: every name outside the stem and the blocks
    gets layer id L + 1). Appended sub-modules that carry a block index (a stage's transition) stay put.
    """
    if match is None or isinstance(match, str):
        return match
    return [(pattern, suffix) for pattern, suffix in match
            if not (tuple(suffix or ()) == MATCH_PREV_GROUP and re.compile(pattern).groups == 0)]


class Classifier(nn.Module):
    """backbone -> linear head. With `freeze_backbone` the backbone gets no gradients and stays in eval
    mode (its BatchNorm statistics frozen) whatever `train()` the engine calls.
    """

    def __init__(
        self, backbone: nn.Module, num_classes: int, *, freeze_backbone: bool = False, head_batch_norm: bool = False,
        head_zero_init: bool = False,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = LinearHead(backbone.embed_dim, num_classes, batch_norm=head_batch_norm, zero_init=head_zero_init)
        self.freeze_backbone = freeze_backbone
        if freeze_backbone:
            backbone.requires_grad_(False)
            backbone.eval()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images))  # [B, C, H, W] -> features [B, D] -> logits [B, K]

    def train(self, mode: bool = True) -> Classifier:
        super().train(mode)
        if self.freeze_backbone:
            self.backbone.eval()
        return self

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any] | Any:
        """The backbone's timm layer grouping under `backbone.`; the head, matched by none, is the last layer."""
        inner = getattr(self.backbone, "group_matcher", None)
        if inner is None:
            raise ConfigError(
                f"backbone {getattr(self.backbone, 'backbone_name', type(self.backbone).__name__)!r} has no timm "
                "group_matcher, so layer-wise lr decay cannot tell its layers apart; use --mode discriminative."
            )
        spec = inner(coarse=coarse)
        if isinstance(spec, dict):
            spec = {group: _without_tail(match) for group, match in spec.items()}
        if callable(spec):
            prefix = "backbone."
            return lambda name: spec(name[len(prefix):]) if name.startswith(prefix) else (float("inf"),)
        out: dict[str, Any] = {}
        for group, match in spec.items():
            if match is None or isinstance(match, str):
                out[group] = match if match is None else _under("backbone", match)
            else:  # [(regex, ordinal suffix), ...]
                out[group] = [(_under("backbone", pattern), suffix) for pattern, suffix in match]
        return out

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """The backbone's own exemptions (position embeddings, class tokens), under `backbone.`."""
        inner = getattr(self.backbone, "no_weight_decay", None)
        return {f"backbone.{name}" for name in inner()} if inner is not None else set()


class SupervisedTask(nn.Module):
    """The Method-like module the engine trains: forward(batch) -> StepOutput(cross-entropy, metrics).

    `model` maps inputs (images, or cached features for the linear probe) to logits. Optional: label
    smoothing, Mixup/CutMix (timm; soft targets), an EMA of `model` updated after every step, and SWA's
    average of `model` (selfsup/averaging.py) updated at the end of each epoch after `swa_start_epoch`.
    """

    def __init__(
        self,
        model: nn.Module,
        num_classes: int,
        *,
        label_smoothing: float = 0.0,
        mixup: float = 0.0,
        cutmix: float = 0.0,
        ema_decay: float | None = None,
        swa_start_epoch: int | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.mixup = None
        if mixup > 0 or cutmix > 0:
            self.mixup = Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, label_smoothing=label_smoothing,
                               num_classes=num_classes)
            self.criterion: nn.Module = SoftTargetCrossEntropy()  # smoothing is inside the mixed targets
        elif label_smoothing > 0:
            self.criterion = LabelSmoothingCrossEntropy(label_smoothing)
        else:
            self.criterion = nn.CrossEntropyLoss()
        self.ema = None
        if ema_decay is not None:
            # decay warms up as 1 - (1 + t)^(-2/3), so short runs do not average in the initial weights
            self.ema = ModelEmaV3(model, decay=ema_decay, use_warmup=True)
            self.ema.requires_grad_(False)  # not trained, not in the optimizer, not synced by DDP
            self.register_buffer("ema_updates", torch.zeros((), dtype=torch.long))  # checkpointed with the EMA
        self.swa, self.swa_start_epoch = None, swa_start_epoch
        if swa_start_epoch is not None:
            self.swa = make_swa_model(model)  # its snapshot count `n_averaged` is a buffer: checkpointed too

    def forward(self, batch: Any) -> StepOutput:
        inputs, targets = batch
        if isinstance(inputs, (list, tuple)):  # one view from the MultiView transform
            inputs = inputs[0]
        if self.mixup is not None:
            if inputs.shape[0] % 2:
                raise ValueError(f"Mixup/CutMix pair up the batch: use an even data.batch_size, got {inputs.shape[0]}.")
            inputs, soft_targets = self.mixup(inputs, targets)  # soft_targets: [B, K]
            return StepOutput(self.criterion(self.model(inputs), soft_targets))
        logits = self.model(inputs)  # [B, K]
        accuracy = 100.0 * (logits.detach().argmax(dim=1) == targets).float().mean()
        return StepOutput(self.criterion(logits, targets), {"train_top1": accuracy})

    @torch.no_grad()
    def after_step(self, progress: float) -> None:
        if self.ema is not None:
            self.ema_updates += 1
            self.ema.update(self.model, step=int(self.ema_updates))

    @torch.no_grad()
    def after_epoch(self, epoch: int) -> None:
        """SWA: a snapshot at the end of every epoch trained at SWA's rate (epochs after swa_start_epoch)."""
        if self.swa is not None and epoch > self.swa_start_epoch:
            self.swa.update_parameters(self.model)

    def train(self, mode: bool = True) -> SupervisedTask:
        super().train(mode)
        for average in (self.ema, self.swa):
            if average is not None:
                average.eval()  # the averages are only ever evaluated
        return self


def build_finetune_optimizer(model: Classifier, cfg: Config, lr: float) -> torch.optim.Optimizer:
    """Parameter groups of `cfg.finetune.mode`; timm's scheduler multiplies each group's lr by its `lr_scale`.

    frozen / full: one lr (a frozen backbone has requires_grad=False and stays out);
    discriminative: backbone groups at lr x backbone_lr_scale; layer_decay: group of layer i at
    lr x decay^(L + 1 - i) from timm's grouping (head and the backbone's final norm: L + 1, as in MAE).
    Biases, norms, position embeddings and class tokens never get weight decay.
    """
    mode, optim = cfg.finetune.mode, cfg.optim
    if mode == "layer_decay" and optim.layer_decay is None:
        raise ConfigError("--mode layer_decay needs a decay rate: pass --layer-decay 0.65 (optim.layer_decay).")
    if mode != "layer_decay" and optim.layer_decay is not None:
        raise ConfigError(f"optim.layer_decay={optim.layer_decay} only applies with --mode layer_decay (mode is {mode!r}).")
    if mode == "frozen" and any(p.requires_grad for p in model.backbone.parameters()):
        raise ValueError("--mode frozen needs Classifier(..., freeze_backbone=True).")
    if mode != "discriminative":
        return build_optimizer(model, optim, lr)
    groups = []
    for module, scale in ((model.backbone, cfg.finetune.backbone_lr_scale), (model.head, 1.0)):
        no_decay = getattr(module, "no_weight_decay", lambda: set())()
        for group in param_groups_weight_decay(
            module, weight_decay=optim.weight_decay, weight_decay_exclude_1d=optim.exclude_bias_and_norm,
            no_weight_decay_list=no_decay,
        ):
            if group["params"]:
                groups.append({**group, "lr_scale": scale})
    return build_optimizer(groups, optim, lr)


def with_drop_path(backbone: nn.Module, rate: float) -> nn.Module:
    """The same backbone and weights rebuilt with stochastic depth `rate` (timm's `drop_path_rate` is a build argument).

    Also when the rate is 0 and the encoder was pretrained with stochastic depth (e.g. a DINO student's 0.1).
    """
    if rate == getattr(backbone, "backbone_kwargs", {}).get("drop_path_rate", 0.0):
        return backbone
    kwargs = {**backbone.backbone_kwargs, "drop_path_rate": rate}
    try:
        rebuilt = create_backbone(backbone.backbone_name, **kwargs)
    except TypeError as e:
        raise ConfigError(f"backbone {backbone.backbone_name!r} takes no drop_path_rate ({e}); set finetune.drop_path_rate=0.") from e
    rebuilt.load_state_dict(backbone.state_dict())
    return rebuilt
