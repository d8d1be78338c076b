"""iBOT (Zhou et al. 2022, "iBOT: Image BERT Pre-Training with Online Tokenizer").

DINO's self-distillation of the [CLS] token (`selfsup.methods.dino`: student and EMA teacher, centred and
sharpened teacher, multi-crop) plus masked image modelling with the teacher as an online tokenizer (Sec. 3.2):
each global crop of the student gets a blockwise mask (BEiT's blocks, `masking.block_mask`; per image a ratio
drawn as the paper's `pred_ratio` 0 / 0.3 +- 0.2: half the images unmasked, half with 10-50 % of the patches),
its masked patch embeddings are replaced by a learned mask token, and each masked patch token of the student is
trained to match the teacher's output for the same token of the same crop, unmasked (Eq. 2):

  L_MIM = - sum_i m_i P_t(u_i) log P_s(u~_i) / sum_i m_i, per image, averaged over images and global crops,
  L = lambda1 L_[CLS] + lambda2 L_MIM (both 1 in the paper).

Patch tokens have their own centre (EMA 0.9 over the global batch of every process) and their own teacher
temperature (0.04 -> 0.07). The patch tokens go through the same head: with `shared_head` (the README's
recipe) also through the same prototypes, otherwise through prototypes of their own (`patch_out_dim`).
ViTs only: the mask works on patch tokens (timm's VisionTransformer, driven as its `forward_features`).
Export: the student's backbone, or the teacher's (`method.export: teacher`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from selfsup.config import ConfigError
from selfsup.heads import DINOHead
from selfsup.losses import masked_self_distillation, self_distillation
from selfsup.masking import block_mask
from selfsup.methods.base import Method, StepOutput
from selfsup.methods.dino import (
    EXPORTS, check_view_sizes, forward_by_size, linear_warmup, optim_recipe, update_center_,
)
from selfsup.momentum import cosine_momentum, momentum_copy, momentum_update


@dataclass
class IBOTConfig:
    name: str = "ibot"
    out_dim: int = 8192  # K prototypes of the [CLS] head (main_ibot.py --out_dim; README 8192)
    patch_out_dim: int = 8192  # prototypes of the patch tokens when the head is not shared
    shared_head: bool = True  # patch tokens use the [CLS] prototypes (README's recipe; code default false)
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    head_layers: int = 3
    head_batch_norm: bool = False
    norm_last_layer: bool = False  # README's ViT-S/16 command (--norm_last_layer false); code default true
    freeze_last_layer: float = 1.0  # epochs
    student_temperature: float = 0.1
    teacher_temperature: float = 0.07  # [CLS], after the warm-up (README; code default 0.04)
    warmup_teacher_temperature: float = 0.04
    teacher_patch_temperature: float = 0.07  # patch tokens, after the warm-up
    warmup_teacher_patch_temperature: float = 0.04
    warmup_teacher_temperature_epochs: float = 30.0
    center_momentum: float = 0.9
    patch_center_momentum: float = 0.9
    momentum: float = 0.996  # m0 of the teacher's cosine schedule to 1
    mask_ratio: tuple[float, ...] = (0.0, 0.3)  # pred_ratio: per image one of these, +- mask_ratio_var
    mask_ratio_var: tuple[float, ...] = (0.0, 0.2)  # pred_ratio_var
    cls_weight: float = 1.0  # lambda1
    patch_weight: float = 1.0  # lambda2
    export: str = "student"

    def __post_init__(self) -> None:
        if self.export not in EXPORTS:
            raise ConfigError(f"method.export must be student or teacher, got {self.export!r}.")
        if self.shared_head and self.patch_out_dim != self.out_dim:
            raise ConfigError(f"method.shared_head=true gives patch tokens the [CLS] prototypes: method.patch_out_dim "
                              f"({self.patch_out_dim}) must equal method.out_dim ({self.out_dim}), or set shared_head=false.")
        if len(self.mask_ratio) != len(self.mask_ratio_var) or not self.mask_ratio:
            raise ConfigError("method.mask_ratio and method.mask_ratio_var need the same number of values (e.g. [0, 0.3] "
                              "and [0, 0.2]).")
        for ratio, var in zip(self.mask_ratio, self.mask_ratio_var):
            if not (0.0 <= ratio - var and ratio + var < 1.0):
                raise ConfigError(f"method.mask_ratio {ratio} +- {var} must stay within [0, 1).")
        for key in ("student_temperature", "teacher_temperature", "warmup_teacher_temperature",
                    "teacher_patch_temperature", "warmup_teacher_patch_temperature"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"method.{key} must be > 0, got {getattr(self, key)}.")


def vit_tokens(vit: VisionTransformer, x: Tensor, mask: Tensor | None = None, mask_token: Tensor | None = None) -> Tensor:
    """timm's `forward_features` with the masked patch embeddings replaced by the mask token (before the position
    embedding, as iBOT's `mask_model`): x [N, C, H, W], mask [N, h, w] -> tokens [N, P + h*w, D]."""
    if mask is None:
        return vit.forward_features(x)
    t = vit.patch_embed(x)  # [N, h*w, D], or [N, h, w, D] with dynamic_img_size
    t = torch.where(mask.view(*t.shape[:-1], 1), mask_token.to(t.dtype), t)
    t = vit.norm_pre(vit.patch_drop(vit._pos_embed(t)))  # [N, P + h*w, D]
    return vit.norm(vit.blocks(t))


class IBOT(Method):
    views = "ibot"
    Config = IBOTConfig
    num_global_views = 2

    def __init__(self, backbone: nn.Module, cfg: IBOTConfig):
        super().__init__()
        if not isinstance(backbone, VisionTransformer):
            raise ConfigError(f"iBOT masks patch tokens and needs a ViT backbone (a timm VisionTransformer, e.g. "
                              f"vit_tiny_patch4), got {type(backbone).__name__}; set backbone.name to a ViT or use method.name=dino.")
        self.cfg = cfg
        self.backbone = backbone
        self.mask_token = nn.Parameter(torch.zeros(1, backbone.embed_dim))  # iBOT's masked_embed, zeros
        self.head = DINOHead(backbone.embed_dim, cfg.out_dim, cfg.hidden_dim, cfg.bottleneck_dim, cfg.head_layers,
                             batch_norm=cfg.head_batch_norm, norm_last_layer=cfg.norm_last_layer,
                             patch_out_dim=None if cfg.shared_head else cfg.patch_out_dim)
        self.teacher_backbone = momentum_copy(self.backbone, stochastic=False)  # no drop path (main_ibot.py L206-215)
        self.teacher_head = momentum_copy(self.head)
        self.register_buffer("center", torch.zeros(1, cfg.out_dim))  # [CLS] centre [1, K]
        self.register_buffer("patch_center", torch.zeros(1, cfg.out_dim if cfg.shared_head else cfg.patch_out_dim))
        self._ddp_params_and_buffers_to_ignore = ["center", "patch_center"]  # equal on every rank (all_reduce)
        self.step, self.total_steps, self.steps_per_epoch = 0, 1, 1

    @property
    def encoder(self) -> nn.Module:
        return self.get_submodule(self.encoder_key(self.cfg))  # what the run exports and evaluates

    @classmethod
    def encoder_key(cls, cfg: IBOTConfig) -> str:
        return "teacher_backbone" if cfg.export == "teacher" else "backbone"

    @classmethod
    def optim_defaults(cls, cfg: IBOTConfig, backbone_name: str, backbone_kwargs: dict) -> dict:
        return optim_recipe(backbone_name, backbone_kwargs)  # main_ibot.py: DINO's defaults

    def no_weight_decay(self) -> set[str]:
        return super().no_weight_decay() | {"mask_token"}

    # -- schedules ------------------------------------------------------------------------------------

    def on_fit_start(self, step: int, total_steps: int, steps_per_epoch: int) -> None:
        self.step, self.total_steps, self.steps_per_epoch = step, total_steps, max(steps_per_epoch, 1)

    def temperatures(self) -> tuple[float, float]:
        """(tau_t of [CLS], tau_t of the patch tokens), each warmed up linearly over the same epochs."""
        cfg, epoch = self.cfg, self.step / self.steps_per_epoch
        return (linear_warmup(epoch, cfg.warmup_teacher_temperature, cfg.teacher_temperature, cfg.warmup_teacher_temperature_epochs),
                linear_warmup(epoch, cfg.warmup_teacher_patch_temperature, cfg.teacher_patch_temperature,
                              cfg.warmup_teacher_temperature_epochs))

    def last_layer_frozen(self) -> bool:
        return self.step / self.steps_per_epoch < self.cfg.freeze_last_layer

    # -- masks ----------------------------------------------------------------------------------------

    def draw_masks(self, n: int, grid: tuple[int, int]) -> Tensor:
        """[n, h, w] bool block masks, the ratio of each drawn as iBOT's get_pred_ratio (torch's global RNG, whose
        state the checkpoints keep, so a resumed run draws the same masks)."""
        choices = len(self.cfg.mask_ratio)
        masks = []
        for _ in range(n):
            u = torch.rand(2, dtype=torch.float64).tolist()
            k = min(int(u[0] * choices), choices - 1)
            ratio, var = self.cfg.mask_ratio[k], self.cfg.mask_ratio_var[k]
            ratio = ratio - var + 2 * var * u[1]
            masks.append(block_mask(grid, ratio * grid[0] * grid[1]))
        return torch.stack(masks)  # [n, h, w]

    # -- training step --------------------------------------------------------------------------------

    def forward(self, batch) -> StepOutput:
        views, _ = batch
        views = list(views)
        if len(views) < self.num_global_views:
            raise ValueError(f"iBOT needs 2 global views (+ local ones) per image, got {len(views)}; use data.preset: ibot.")
        check_view_sizes(self.backbone, views)
        g, n = self.num_global_views, views[0].shape[0]
        x = torch.cat(views[:g])  # global crops: [G*N, C, H, W]
        patch = self.backbone.patch_size
        grid = (x.shape[-2] // patch, x.shape[-1] // patch)
        masks = self.draw_masks(g * n, grid).to(x.device)  # [G*N, h, w]
        frozen, prefix = self.last_layer_frozen(), self.backbone.num_prefix_tokens

        # student: masked global crops ([CLS] + patch tokens), local crops ([CLS] only)
        tokens = vit_tokens(self.backbone, x, masks, self.mask_token)  # [G*N, P + L, D]
        cls = self.head(self.backbone.forward_head(tokens, pre_logits=True), frozen)  # [G*N, K]
        if len(views) > g:
            cls = torch.cat([cls, self.head(forward_by_size(self.backbone, views[g:]), frozen)])  # [V*N, K]
        student_cls = cls.view(len(views), n, -1)  # [V, N, K]
        length, dim = tokens.shape[1] - prefix, tokens.shape[-1]
        student_patch = self.head(tokens[:, prefix:].reshape(-1, dim), frozen, patch=True).view(g, n, length, -1)

        # teacher: unmasked global crops
        with torch.no_grad():
            t_tokens = vit_tokens(self.teacher_backbone, x)  # [G*N, P + L, D]
            teacher_cls = self.teacher_head(self.teacher_backbone.forward_head(t_tokens, pre_logits=True)).view(g, n, -1)
            teacher_patch = self.teacher_head(t_tokens[:, prefix:].reshape(-1, dim), patch=True).view(g, n, length, -1)
            dtype = torch.promote_types(teacher_cls.dtype, torch.float32)
            teacher_cls, teacher_patch = teacher_cls.to(dtype), teacher_patch.to(dtype)
        temperature, patch_temperature = self.temperatures()
        cls_probs = F.softmax((teacher_cls - self.center) / temperature, dim=-1)  # [G, N, K]
        patch_probs = F.softmax((teacher_patch - self.patch_center) / patch_temperature, dim=-1)  # [G, N, L, K']

        cls_loss = self_distillation(student_cls, cls_probs, self.cfg.student_temperature)
        patch_loss = masked_self_distillation(student_patch, patch_probs, masks.view(g, n, length),
                                              self.cfg.student_temperature)
        loss = self.cfg.cls_weight * cls_loss + self.cfg.patch_weight * patch_loss
        if self.training:
            update_center_(self.center, teacher_cls.mean(dim=(0, 1)), self.cfg.center_momentum)
            update_center_(self.patch_center, teacher_patch.mean(dim=(0, 1, 2)), self.cfg.patch_center_momentum)
        return StepOutput(loss, {"cls_loss": cls_loss.detach(), "patch_loss": patch_loss.detach(),
                                 "teacher_temperature": temperature})

    def backbone_passes(self, views: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        return list(views), list(views[: self.num_global_views])

    # -- after each optimizer step --------------------------------------------------------------------

    def momentum_at(self, progress: float) -> float:
        return cosine_momentum(progress, self.cfg.momentum)

    def after_step(self, progress: float) -> None:
        momentum_update([self.backbone, self.head], [self.teacher_backbone, self.teacher_head],
                        self.momentum_at(progress), buffers="average")
        self.step = round(progress * self.total_steps)
