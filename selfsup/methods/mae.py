"""MAE (He et al. 2022, "Masked Autoencoders Are Scalable Vision Learners").

Sec. 3 of the paper: split the image into patches, keep a random 25% of them, encode only the
visible patches (plus the class token) with the ViT, append a shared mask token at every removed
position, decode the full set with a light Transformer, and regress the pixels of each patch;
the loss is the MSE on removed patches only, against per-patch normalised pixels (norm_pix_loss).
The encoder is the registry's timm VisionTransformer itself, driven submodule by submodule, initialised
as MAE's code does (`init_encoder`), with its position embedding fixed to 2-D sin-cos values (frozen, so
the export carries them).

Gradient accumulation (`train.accumulate_steps`) is exact here: the loss is a mean of per-sample losses
(every sample has the same number of masked patches) and the ViT has no BatchNorm, so k micro-batches of
B give the gradient of one batch of k x B (up to float rounding).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from selfsup.masking import (
    check_vit,
    masked_mse,
    patch_pos_embed,
    patchify,
    prefix_tokens,
    random_masking,
    sincos_pos_embed,
    unpatchify,
    vit_patch_grid,
)
from selfsup.methods.base import Method, StepOutput


@dataclass
class MAEConfig:
    name: str = "mae"
    mask_ratio: float = 0.75  # fraction of patches removed (the paper's 75%)
    norm_pix_loss: bool = True  # targets normalised by each patch's mean and std (Table 1c)
    decoder_embed_dim: int | None = None  # None: 2/3 of the encoder width, at most 512 (the paper's)
    decoder_depth: int | None = None  # None: 2/3 of the encoder depth, at most 8 (the paper's)
    decoder_num_heads: int | None = None  # None: head size 32 (512 / 16 in the paper)
    decoder_mlp_ratio: float = 4.0


def decoder_defaults(cfg: MAEConfig, embed_dim: int, depth: int) -> tuple[int, int, int]:
    """The paper's 512-d, 8-block, 16-head decoder for ViT-B and larger, scaled down for smaller encoders."""
    dim = cfg.decoder_embed_dim or min(512, max(32, round(embed_dim * 2 / 3 / 32) * 32))
    blocks = cfg.decoder_depth or max(1, min(8, depth * 2 // 3))
    heads = cfg.decoder_num_heads or max(1, dim // 32)
    if dim % heads:
        raise ValueError(f"method.decoder_embed_dim={dim} is not divisible by method.decoder_num_heads={heads}")
    return dim, blocks, heads


@torch.no_grad()
def init_encoder(vit: nn.Module) -> None:
    """The encoder's initialisation in MAE's code (models_mae.py `initialize_weights`), not timm's ViT default:
    xavier-uniform Linear weights and zero biases, LayerNorms at 1 / 0, the patch embedding initialised as the
    Linear layer it is (xavier-uniform on its weight viewed as [D, C*p*p]), the class token N(0, 0.02).
    """
    for module in vit.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm) and module.elementwise_affine:
            nn.init.ones_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    weight = vit.patch_embed.proj.weight  # [D, C, p, p]
    nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))  # fans of a Linear C*p*p -> D; bias: torch's default
    if getattr(vit, "cls_token", None) is not None:
        nn.init.normal_(vit.cls_token, std=0.02)


class MAE(Method):
    views = "mae"
    Config = MAEConfig

    @classmethod
    def optim_defaults(cls, cfg, backbone_name, backbone_kwargs):
        # MAE Table 8: AdamW, base lr 1.5e-4 per 256, weight decay 0.05, beta2 0.95, 40 warmup epochs
        return {"name": "adamw", "lr": 1.5e-4, "weight_decay": 0.05, "betas": (0.9, 0.95), "warmup_epochs": 40.0}

    def __init__(self, backbone: nn.Module, cfg: MAEConfig):
        super().__init__()
        self.cfg = cfg
        vit = check_vit(backbone, "MAE")
        if vit.pos_embed is None:
            raise ValueError("MAE adds sin-cos position embeddings to the ViT's pos_embed; drop backbone.kwargs.pos_embed")
        self.encoder = vit
        grid_h, grid_w, self.patch_size = vit_patch_grid(vit)
        self.grid_size = (grid_h, grid_w)
        self.in_chans = vit.patch_embed.proj.in_channels
        self.num_prefix = vit.num_prefix_tokens
        embed_dim = vit.embed_dim

        init_encoder(vit)
        # fixed 2-D sin-cos position embedding of the encoder, frozen inside the ViT's own parameter
        prefix_in_table = 0 if vit.no_embed_class else self.num_prefix
        with torch.no_grad():
            vit.pos_embed.copy_(sincos_pos_embed(self.grid_size, embed_dim, prefix_in_table))
        vit.pos_embed.requires_grad_(False)

        # the light decoder (Sec. 3 "MAE decoder"): only used during pretraining
        dec_dim, dec_depth, dec_heads = decoder_defaults(cfg, embed_dim, len(vit.blocks))
        self.decoder_embed = nn.Linear(embed_dim, dec_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dec_dim))
        self.register_buffer(
            "decoder_pos_embed", sincos_pos_embed(self.grid_size, dec_dim, self.num_prefix), persistent=False
        )
        self.decoder_blocks = nn.Sequential(
            *[Block(dec_dim, dec_heads, cfg.decoder_mlp_ratio, qkv_bias=True) for _ in range(dec_depth)]
        )
        self.decoder_norm = nn.LayerNorm(dec_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(dec_dim, self.patch_size**2 * self.in_chans)  # pixels of one patch
        self._init_decoder()

    def _init_decoder(self) -> None:
        """As the paper's code: xavier-uniform linear layers, N(0, 0.02) mask token."""
        nn.init.normal_(self.mask_token, std=0.02)
        for module in [self.decoder_embed, self.decoder_pred, *self.decoder_blocks.modules()]:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

    def forward_encoder(
        self, images: Tensor, mask_ratio: float, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Encode a random visible subset: images [N, C, H, W] -> latent [N, P + K, D], mask [N, L], ids_restore [N, L]."""
        vit = self.encoder
        x = vit.patch_embed(images)  # [N, L, D]
        x = x + patch_pos_embed(vit)  # position first, so kept tokens carry where they came from
        x, mask, ids_restore = random_masking(x, mask_ratio, generator)  # x: [N, K, D]
        prefix = prefix_tokens(vit, x.shape[0])  # [N, P, D] (class token, position embedding 0)
        if prefix is not None:
            x = torch.cat([prefix, x], dim=1)  # [N, P + K, D]
        x = vit.norm_pre(vit.pos_drop(x))
        x = vit.norm(vit.blocks(x))  # [N, P + K, D]
        return x, mask, ids_restore

    def forward_decoder(self, latent: Tensor, ids_restore: Tensor) -> Tensor:
        """Mask tokens at removed positions, full-length decoding: latent [N, P + K, D] -> pixels [N, L, p*p*C]."""
        x = self.decoder_embed(latent)  # [N, P + K, Dd]
        n, length = ids_restore.shape
        prefix, visible = x[:, : self.num_prefix], x[:, self.num_prefix :]  # [N, P, Dd], [N, K, Dd]
        masked = self.mask_token.expand(n, length - visible.shape[1], -1)  # [N, L - K, Dd]
        shuffled = torch.cat([visible, masked], dim=1)  # [N, L, Dd] in shuffled order (kept first)
        patches = shuffled.gather(1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # unshuffle: [N, L, Dd]
        x = torch.cat([prefix, patches], dim=1) + self.decoder_pos_embed  # [N, P + L, Dd]
        x = self.decoder_norm(self.decoder_blocks(x))
        return self.decoder_pred(x[:, self.num_prefix :])  # [N, L, p*p*C]

    def targets(self, images: Tensor) -> Tensor:
        """Pixels per patch [N, L, p*p*C], normalised per patch when norm_pix_loss (Sec. 3 "Reconstruction target")."""
        target = patchify(images, self.patch_size)  # [N, L, p*p*C]
        if self.cfg.norm_pix_loss:
            target = target.float()
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6).sqrt()
        return target

    def forward_loss(self, images: Tensor, pred: Tensor, mask: Tensor) -> Tensor:
        """MSE on removed patches only: images [N, C, H, W], pred [N, L, p*p*C], mask [N, L]."""
        return masked_mse(pred, self.targets(images), mask)

    def forward(self, batch) -> StepOutput:
        views, _ = batch
        images = torch.cat(list(views))  # one view per image in the paper's recipe: [N, C, H, W]
        latent, mask, ids_restore = self.forward_encoder(images, self.cfg.mask_ratio)
        pred = self.forward_decoder(latent, ids_restore)
        return StepOutput(self.forward_loss(images, pred, mask), {})

    @torch.no_grad()
    def reconstruct(self, images: Tensor) -> dict[str, Tensor]:
        """Fixed masks (seed 0); the reconstruction keeps visible patches and shows predictions elsewhere."""
        generator = torch.Generator().manual_seed(0)
        latent, mask, ids_restore = self.forward_encoder(images, self.cfg.mask_ratio, generator)
        pred = self.forward_decoder(latent, ids_restore).float()  # [N, L, p*p*C]
        patches = patchify(images, self.patch_size).float()  # [N, L, p*p*C]
        if self.cfg.norm_pix_loss:  # predictions are in per-patch normalised units: undo with the true stats
            pred = pred * (patches.var(dim=-1, keepdim=True) + 1e-6).sqrt() + patches.mean(dim=-1, keepdim=True)
        removed = mask.unsqueeze(-1)  # [N, L, 1]
        to_image = lambda p: unpatchify(p, self.patch_size, self.grid_size, self.in_chans)  # noqa: E731
        return {
            "original": images.float(),
            "masked": to_image(patches * (1 - removed)),
            "reconstruction": to_image(patches * (1 - removed) + pred * removed),
        }

    def no_weight_decay(self) -> set[str]:
        return super().no_weight_decay() | {"mask_token"}
