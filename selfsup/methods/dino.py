"""DINO (Caron et al. 2021, "Emerging Properties in Self-Supervised Vision Transformers").

Alg. 1 of the paper: a student g_s (backbone + DINO head) and a teacher g_t of the same architecture that
only follows it, theta_t <- m theta_t + (1 - m) theta_s after every step (m: cosine 0.996 -> 1). Each image
gives 2 global and N local crops (multi-crop: `data.preset: dino`, `data.views.local_crops`); the teacher
sees the global crops only, the student all of them. The teacher's output is centred and sharpened,
P_t = softmax((g_t(x) - c) / tau_t), the student's is P_s = softmax(g_s(x') / tau_s), and the loss is the
cross-entropy H(P_t, P_s) over every (teacher crop, other student crop) pair (`losses.self_distillation`).
The centre c is an EMA (0.9) of the teacher's mean output over the global batch of every process, so all
ranks hold the same c; tau_t warms up linearly 0.04 -> 0.07 over the first 30 epochs.

Crops of one size go through the backbone together (the official MultiCropWrapper). A ViT takes local crops
of another size only with `backbone.kwargs.dynamic_img_size: true` (timm interpolates its position
embedding); a ResNet takes any size. The last layer of the head is frozen (zero gradient) for the first
`freeze_last_layer` epochs; the official code sets those gradients to None, so AdamW then skips the layer,
while here its decoupled weight decay still shrinks v, which leaves the weight-normalised prototypes as
they are. `method.export`: the student's backbone (default) or the teacher's, which the paper evaluates.

Gradient accumulation (`train.accumulate_steps`): the centre is updated at every micro-batch, so k
micro-batches of B are not one batch of k x B; the loss of each is exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfsup import distributed
from selfsup.backbones import is_patch_model
from selfsup.config import ConfigError
from selfsup.heads import DINOHead
from selfsup.losses import self_distillation
from selfsup.methods.base import Method, StepOutput
from selfsup.momentum import cosine_momentum, momentum_copy, momentum_update

EXPORTS = ("student", "teacher")


@dataclass
class DINOConfig:
    name: str = "dino"
    out_dim: int = 65536  # K prototypes (main_dino.py --out_dim)
    hidden_dim: int = 2048  # the head's MLP width
    bottleneck_dim: int = 256
    head_layers: int = 3
    head_batch_norm: bool = False  # --use_bn_in_head
    norm_last_layer: bool = True  # prototypes' norm g fixed to 1
    freeze_last_layer: float = 1.0  # epochs with a frozen last layer
    student_temperature: float = 0.1  # tau_s
    teacher_temperature: float = 0.07  # tau_t after the warm-up (the paper's; the code's default 0.04)
    warmup_teacher_temperature: float = 0.04  # tau_t at the start
    warmup_teacher_temperature_epochs: float = 30.0  # linear warm-up of tau_t (the paper's; the code's default 0)
    center_momentum: float = 0.9  # m of the centre's EMA
    momentum: float = 0.996  # m0 of the teacher's cosine schedule to 1
    export: str = "student"  # student | teacher: whose backbone is the run's encoder

    def __post_init__(self) -> None:
        if self.export not in EXPORTS:
            raise ConfigError(f"method.export must be student or teacher, got {self.export!r}.")
        for key in ("out_dim", "hidden_dim", "bottleneck_dim", "head_layers"):
            if getattr(self, key) < 1:
                raise ConfigError(f"method.{key} must be >= 1, got {getattr(self, key)}.")
        for key in ("student_temperature", "teacher_temperature", "warmup_teacher_temperature"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"method.{key} must be > 0, got {getattr(self, key)}.")
        for key in ("momentum", "center_momentum"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ConfigError(f"method.{key} must lie in [0, 1], got {getattr(self, key)}.")
        if self.freeze_last_layer < 0 or self.warmup_teacher_temperature_epochs < 0:
            raise ConfigError("method.freeze_last_layer and method.warmup_teacher_temperature_epochs are epochs >= 0.")


def optim_recipe(backbone_name: str, backbone_kwargs: dict) -> dict:
    """ViTs: AdamW 5e-4 per 256, weight decay cosine 0.04 -> 0.4, 10 warm-up epochs, min lr 1e-6 (main_dino.py
    defaults); ResNets: the README's ResNet-50 command, SGD 0.03 with a constant weight decay of 1e-4."""
    if is_patch_model(backbone_name, **backbone_kwargs):
        return {"name": "adamw", "lr": 5e-4, "weight_decay": 0.04, "weight_decay_end": 0.4, "betas": (0.9, 0.999),
                "warmup_epochs": 10.0, "min_lr": 1e-6}
    return {"name": "sgd", "lr": 0.03, "weight_decay": 1e-4, "weight_decay_end": 1e-4, "momentum": 0.9,
            "warmup_epochs": 10.0, "min_lr": 1e-6}


def linear_warmup(epoch: float, start: float, end: float, epochs: float) -> float:
    """start -> end linearly over the first `epochs` epochs, then end (the teacher temperature's warm-up)."""
    if epochs <= 0 or epoch >= epochs:
        return end
    return start + (end - start) * epoch / epochs


@torch.no_grad()
def update_center_(center: Tensor, teacher_mean: Tensor, momentum: float) -> None:
    """In place c <- m c + (1 - m) mean over every process of `teacher_mean` (each process's mean over its own
    batch, the same N on each: so the mean over the global batch). A non-finite batch leaves c as it was."""
    batch_center = distributed.all_reduce_mean(teacher_mean)  # [K]
    finite = torch.isfinite(batch_center).all()
    center.copy_(torch.where(finite, center * momentum + batch_center * (1.0 - momentum), center))


def forward_by_size(backbone: nn.Module, views: list[Tensor]) -> Tensor:
    """Backbone features of every view, consecutive views of one size in one batch (the official
    MultiCropWrapper): V x [N, C, S_v, S_v] -> [V*N, D], rows in view order."""
    features, start = [], 0
    while start < len(views):
        stop = start + 1
        while stop < len(views) and views[stop].shape[-2:] == views[start].shape[-2:]:
            stop += 1
        features.append(backbone(torch.cat(views[start:stop])))  # [(stop - start) * N, D]
        start = stop
    return torch.cat(features)  # [V*N, D]


def check_view_sizes(backbone: nn.Module, views: list[Tensor]) -> None:
    """A ViT built for one size takes others only with dynamic_img_size, and only whole patches."""
    patch_embed = getattr(backbone, "patch_embed", None)
    if patch_embed is None:
        return
    patch = backbone.patch_size
    for x in views:
        size = tuple(x.shape[-2:])
        if size[0] % patch or size[1] % patch:
            raise ConfigError(f"a {size[0]} px view is not a whole number of the ViT's {patch} px patches; set "
                              f"data.views.local_crop_size (or data.image_size) to a multiple of {patch}.")
        if size != tuple(patch_embed.img_size) and not getattr(backbone, "dynamic_img_size", False):
            raise ConfigError(f"the ViT is built for {tuple(patch_embed.img_size)} px but gets {size[0]} px views "
                              f"(multi-crop); set backbone.kwargs.dynamic_img_size: true.")


class DINO(Method):
    views = "dino"
    Config = DINOConfig
    num_global_views = 2

    def __init__(self, backbone: nn.Module, cfg: DINOConfig):
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone  # student g_s: backbone + head
        self.head = DINOHead(backbone.embed_dim, cfg.out_dim, cfg.hidden_dim, cfg.bottleneck_dim, cfg.head_layers,
                             batch_norm=cfg.head_batch_norm, norm_last_layer=cfg.norm_last_layer)
        # g_t = g_s at step 0, never trained; without the student's stochastic depth (main_dino.py L162-166)
        self.teacher_backbone = momentum_copy(self.backbone, stochastic=False)
        self.teacher_head = momentum_copy(self.head)
        self.register_buffer("center", torch.zeros(1, cfg.out_dim))  # c: [1, K], saved in checkpoints
        self._ddp_params_and_buffers_to_ignore = ["center"]  # equal on every rank by construction (all_reduce)
        self.step, self.total_steps, self.steps_per_epoch = 0, 1, 1  # set by on_fit_start
        self._checked_sizes: set[tuple] = set()

    @property
    def encoder(self) -> nn.Module:
        return self.get_submodule(self.encoder_key(self.cfg))  # what the run exports and evaluates

    @classmethod
    def encoder_key(cls, cfg: DINOConfig) -> str:
        return "teacher_backbone" if cfg.export == "teacher" else "backbone"

    @classmethod
    def optim_defaults(cls, cfg: DINOConfig, backbone_name: str, backbone_kwargs: dict) -> dict:
        return optim_recipe(backbone_name, backbone_kwargs)

    # -- schedules kept in epochs ------------------------------------------------------------------

    def on_fit_start(self, step: int, total_steps: int, steps_per_epoch: int) -> None:
        self.step, self.total_steps, self.steps_per_epoch = step, total_steps, max(steps_per_epoch, 1)

    def epoch(self) -> float:
        """Epochs done before the current update (fractional)."""
        return self.step / self.steps_per_epoch

    def teacher_temperature(self) -> float:
        """tau_t: linear from the warm-up value to the final one over the warm-up epochs, then constant."""
        cfg = self.cfg
        return linear_warmup(self.epoch(), cfg.warmup_teacher_temperature, cfg.teacher_temperature,
                             cfg.warmup_teacher_temperature_epochs)

    def last_layer_frozen(self) -> bool:
        return self.epoch() < self.cfg.freeze_last_layer

    # -- the two networks ---------------------------------------------------------------------------

    def student(self, views: list[Tensor]) -> Tensor:
        """g_s on every crop: V x [N, C, S, S] -> logits [V, N, K]."""
        logits = self.head(forward_by_size(self.backbone, views), freeze_last_layer=self.last_layer_frozen())
        return logits.view(len(views), views[0].shape[0], -1)  # [V*N, K] -> [V, N, K]

    @torch.no_grad()
    def teacher(self, views: list[Tensor]) -> Tensor:
        """g_t on the global crops: G x [N, C, S, S] -> logits [G, N, K]."""
        logits = self.teacher_head(forward_by_size(self.teacher_backbone, views))
        return logits.view(len(views), views[0].shape[0], -1)  # [G*N, K] -> [G, N, K]

    # -- training step --------------------------------------------------------------------------------

    def forward(self, batch) -> StepOutput:
        views, _ = batch
        views = list(views)
        if len(views) <= self.num_global_views - 1:
            raise ValueError(f"DINO needs 2 global views (+ local ones) per image, got {len(views)}; "
                             "use data.preset: dino or set data.num_views=2.")
        sizes = tuple(tuple(x.shape[-2:]) for x in views)
        if sizes not in self._checked_sizes:
            check_view_sizes(self.backbone, views)
            self._checked_sizes.add(sizes)
        global_views = views[: self.num_global_views]
        student_logits = self.student(views)  # [V, N, K]
        teacher_logits = self.teacher(global_views)  # [G, N, K]
        temperature = self.teacher_temperature()
        teacher_logits = teacher_logits.to(torch.promote_types(teacher_logits.dtype, torch.float32))  # fp32 at least
        teacher_probs = F.softmax((teacher_logits - self.center) / temperature, dim=-1)  # centre, sharpen
        loss = self_distillation(student_logits, teacher_probs, self.cfg.student_temperature)
        if self.training:
            self.update_center(teacher_logits)
        return StepOutput(loss, {"teacher_temperature": temperature})

    def update_center(self, teacher_logits: Tensor) -> None:
        """c <- m c + (1 - m) mean of the teacher's outputs [G, N, K] over the global batch of every process."""
        update_center_(self.center, teacher_logits.mean(dim=(0, 1)), self.cfg.center_momentum)

    def backbone_passes(self, views: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        return list(views), list(views[: self.num_global_views])  # student: all crops; teacher: the global ones

    # -- after each optimizer step --------------------------------------------------------------------

    def momentum_at(self, progress: float) -> float:
        return cosine_momentum(progress, self.cfg.momentum)

    def after_step(self, progress: float) -> None:
        momentum_update([self.backbone, self.head], [self.teacher_backbone, self.teacher_head],
                        self.momentum_at(progress), buffers="average")
        self.step = round(progress * self.total_steps)
