"""SimMIM (Xie et al. 2022, "SimMIM: A Simple Framework for Masked Image Modeling").

Sec. 3 of the paper: mask random blocks of `mask_patch_size` pixels (32 px at 192 px, 60%; unset, the
block is about a sixth of the image side here too, e.g. 4 px at 32 px),
replace the masked patch embeddings by one learnable mask token, encode ALL tokens with the encoder,
predict raw pixels with a one-layer head (1x1 conv to stride^2 * C channels + pixel shuffle), and
take the L1 loss over masked pixels. Masks are drawn per sample in the data pipeline
(`view_transform`), so a batch is ([images, masks], labels). The encoder is the registry's timm model
itself, driven submodule by submodule: a VisionTransformer (its own position embedding; stride = patch), or
a SwinTransformer as the paper's main results (microsoft/SimMIM models/simmim.py L19-50,
SwinTransformerForSimMIM): the mask token replaces patch embeddings right after the patch embedding, before
the stages, and the head predicts stride x stride pixels per cell of the last stage (stride 32 for Swin-B:
patch 4 x 3 merges, simmim.py L156; here read from the model's last feature reduction).

Gradient accumulation (`train.accumulate_steps`) is exact here: the L1 loss is a mean over samples that
all mask the same number of blocks, and the ViT has no BatchNorm, so k micro-batches of B give the
gradient of one batch of k x B (up to float rounding).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from timm.layers import trunc_normal_
from timm.models.swin_transformer import SwinTransformer
from torch import Tensor, nn

from selfsup.masking import (
    SimMIMMaskGenerator,
    WithMask,
    check_vit,
    masked_l1,
    patch_pos_embed,
    prefix_tokens,
    vit_patch_grid,
)
from selfsup.methods.base import Method, StepOutput


def check_swin(swin: SwinTransformer) -> SwinTransformer:
    """A timm SwinTransformer SimMIM can drive: square patches, a fixed input size (its grid is the mask's)."""
    if getattr(swin, "dynamic_img_size", False) or not getattr(swin.patch_embed, "strict_img_size", True):
        raise ValueError("SimMIM works on a fixed token grid; drop backbone.kwargs.dynamic_img_size / strict_img_size")
    if getattr(swin, "absolute_pos_embed", None) is not None:  # not in timm 1.0's Swin; would be skipped here
        raise ValueError("SimMIM's Swin path expects no absolute position embedding (timm's SwinTransformer has none)")
    return swin


@dataclass
class SimMIMConfig:
    name: str = "simmim"
    # pixels per mask block side: a multiple of the patch size dividing the image, >= 2 x 2 blocks;
    # None: about image side / 6 (SimMIM's 32 px at 192 px), see masking.default_mask_patch_size
    mask_patch_size: int | None = None
    mask_ratio: float = 0.6  # fraction of blocks masked


class SimMIM(Method):
    views = "simmim"
    Config = SimMIMConfig

    @classmethod
    def optim_defaults(cls, cfg, backbone_name, backbone_kwargs):
        # microsoft/SimMIM main_simmim.py scales lr = BASE_LR x batch / 512, with BASE_LR 1e-4 for ViT-B
        # (configs/vit_base__800ep/simmim_pretrain__vit_base__img224__800ep.yaml) and 2e-4 for Swin-B
        # (configs/swin_base__100ep/simmim_pretrain__swin_base__img192_window6__100ep.yaml): 5e-5 and 1e-4
        # per 256 images here. Both files: WARMUP_EPOCHS 10, WEIGHT_DECAY 0.05; config.py:
        # TRAIN.OPTIMIZER.BETAS (0.9, 0.999). The former default, 4e-4 per 256, read the paper's 8e-4 (Sec. 4.1)
        # as per 512 images: 4x / 8x the released rates.
        lr = 1e-4 if backbone_name.lower().startswith("swin") else 5e-5
        return {"name": "adamw", "lr": lr, "weight_decay": 0.05, "betas": (0.9, 0.999), "warmup_epochs": 10.0}

    def __init__(self, backbone: nn.Module, cfg: SimMIMConfig):
        super().__init__()
        self.cfg = cfg
        self.swin = isinstance(backbone, SwinTransformer)
        encoder = check_swin(backbone) if self.swin else check_vit(backbone, "SimMIM")
        self.encoder = encoder
        grid_h, grid_w, self.patch_size = vit_patch_grid(encoder)  # the patch embedding's grid (ViT or Swin)
        self.grid_size = (grid_h, grid_w)
        self.image_size = (grid_h * self.patch_size, grid_w * self.patch_size)
        self.in_chans = encoder.patch_embed.proj.in_channels
        # pixels per cell of the encoder's output: the patch (ViT), the patch x 2 per merge (Swin)
        self.encoder_stride = int(encoder.feature_info[-1]["reduction"]) if self.swin else self.patch_size
        # validates mask_patch_size against the image and patch sizes here, before any data is read
        self.mask_generator = SimMIMMaskGenerator(self.image_size, cfg.mask_patch_size, self.patch_size, cfg.mask_ratio)

        self.mask_token = nn.Parameter(torch.zeros(1, 1, encoder.patch_embed.proj.out_channels))  # patch embedding's width
        trunc_normal_(self.mask_token, std=0.02)
        # prediction head (Sec. 3.3): a linear map per output cell to its stride x stride x C pixels, as 1x1 conv
        # + pixel shuffle; its input is the last stage's width (Swin: embed_dim x 8)
        self.decoder = nn.Sequential(
            nn.Conv2d(encoder.num_features, self.encoder_stride**2 * self.in_chans, kernel_size=1),
            nn.PixelShuffle(self.encoder_stride),
        )

    def view_transform(self, transform: Callable) -> Callable:
        """Each sample becomes [image, mask [h, w]] in the DataLoader workers (off the accelerator)."""
        return WithMask(transform, self.mask_generator)

    def embed(self, images: Tensor, mask: Tensor) -> Tensor:
        """The encoder's input tokens: masked patch embeddings replaced by the mask token, then positions.

        images [N, C, H, W], mask [N, h, w] (True = masked) -> tokens [N, P + L, D].
        """
        vit = self.encoder
        x = vit.patch_embed(images)  # [N, L, D]
        w = mask.flatten(1).unsqueeze(-1).to(x.dtype)  # [N, h, w] -> [N, L, 1]
        x = x * (1 - w) + self.mask_token.to(x.dtype) * w
        pos = patch_pos_embed(vit)
        if pos is not None:
            x = x + pos
        prefix = prefix_tokens(vit, x.shape[0])  # [N, P, D]
        if prefix is not None:
            x = torch.cat([prefix, x], dim=1)  # [N, P + L, D]
        return vit.norm_pre(vit.pos_drop(x))

    def embed_swin(self, images: Tensor, mask: Tensor) -> Tensor:
        """Swin's input to its first stage: masked patch embeddings replaced by the mask token (timm's Swin has no
        absolute position embedding: its stages carry relative position biases).

        images [N, C, H, W], mask [N, h, w] (True = masked) -> x [N, h, w, D] (timm's channels-last layout).
        """
        x = self.encoder.patch_embed(images)  # [N, h, w, D]
        w = mask.unsqueeze(-1).to(x.dtype)  # [N, h, w] -> [N, h, w, 1]
        return x * (1 - w) + self.mask_token.to(x.dtype) * w  # mask_token [1, 1, D] broadcasts

    def forward_encoder(self, images: Tensor, mask: Tensor) -> Tensor:
        """All tokens through the encoder, back on the output grid: z [N, D', h', w'] (ViT: the patch grid)."""
        if self.swin:
            swin = self.encoder
            x = swin.norm(swin.layers(self.embed_swin(images, mask)))  # [N, h / 2^m, w / 2^m, D x 2^m], m merges
            return x.permute(0, 3, 1, 2)  # [N, h', w', D'] -> [N, D', h', w']
        vit = self.encoder
        x = vit.norm(vit.blocks(self.embed(images, mask)))  # [N, P + L, D]
        x = x[:, vit.num_prefix_tokens :]  # [N, L, D]
        return x.transpose(1, 2).reshape(x.shape[0], -1, *self.grid_size)  # [N, L, D] -> [N, D, h, w]

    def forward_decoder(self, z: Tensor) -> Tensor:
        """z [N, D', h', w'] -> [N, s*s*C, h', w'] -> pixels [N, C, h'*s, w'*s], s the encoder stride."""
        return self.decoder(z)

    def forward_loss(self, images: Tensor, reconstruction: Tensor, mask: Tensor) -> Tensor:
        """L1 over masked pixels / (masked pixels x channels); mask [N, h, w] on the patch grid."""
        p = self.patch_size
        pixel_mask = mask.repeat_interleave(p, 1).repeat_interleave(p, 2)  # [N, h, w] -> [N, h*p, w*p]
        return masked_l1(reconstruction, images, pixel_mask)

    def forward(self, batch) -> StepOutput:
        views, _ = batch
        if len(views) != 2:
            raise ValueError(
                "SimMIM expects [images, masks] per batch from its view transform; got "
                f"{len(views)} tensors. Keep data.num_views unset (1) and build the data with build_pretraining."
            )
        images, mask = views
        if tuple(images.shape[-2:]) != self.image_size:
            raise ValueError(
                f"images are {tuple(images.shape[-2:])} but the encoder expects {self.image_size}; "
                "set data.image_size equal to backbone.kwargs.img_size"
            )
        reconstruction = self.forward_decoder(self.forward_encoder(images, mask))
        return StepOutput(self.forward_loss(images, reconstruction, mask), {})

    @torch.no_grad()
    def reconstruct(self, images: Tensor) -> dict[str, Tensor]:
        """Fixed masks (seed 0); the reconstruction keeps visible pixels and shows predictions elsewhere."""
        generator = torch.Generator().manual_seed(0)
        mask = torch.stack([self.mask_generator(generator) for _ in range(images.shape[0])]).to(images.device)
        pred = self.forward_decoder(self.forward_encoder(images, mask)).float()
        p = self.patch_size
        removed = mask.repeat_interleave(p, 1).repeat_interleave(p, 2).unsqueeze(1).float()  # [N, 1, H, W]
        images = images.float()
        return {
            "original": images,
            "masked": images * (1 - removed),
            "reconstruction": images * (1 - removed) + pred * removed,
        }

    def no_weight_decay(self) -> set[str]:
        return super().no_weight_decay() | {"mask_token"}
