"""Masked image modelling: patch reshapes, MAE's random token masking, SimMIM's block masks, the
reconstruction losses on masked positions, and token-level access to timm ViTs.

Written by hand because timm has none of it: timm's PatchDropout drops tokens but returns no
mask or restore indices, and no library ships SimMIM's block-mask generator. Reshapes use einops;
position embeddings come from timm (`build_sincos2d_pos_embed`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from einops import rearrange
from timm.layers.pos_embed_sincos import build_sincos2d_pos_embed
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from selfsup.config import ConfigError

__all__ = [
    "patchify",
    "unpatchify",
    "random_masking",
    "SimMIMMaskGenerator",
    "block_mask",
    "valid_mask_patch_sizes",
    "default_mask_patch_size",
    "WithMask",
    "masked_mse",
    "masked_l1",
    "check_vit",
    "vit_patch_grid",
    "prefix_tokens",
    "patch_pos_embed",
    "sincos_pos_embed",
]


# ---------------------------------------------------------------------------------------------
# patches


def patchify(images: Tensor, patch_size: int) -> Tensor:
    """Images [N, C, H, W] -> patches [N, L, p*p*C], row-major over the (H/p, W/p) grid."""
    _, _, height, width = images.shape
    if height % patch_size or width % patch_size:
        raise ValueError(f"image size {height}x{width} is not a multiple of the patch size {patch_size}")
    # [N, C, h*p, w*p] -> [N, h*w, p*p*C]
    return rearrange(images, "n c (h p) (w q) -> n (h w) (p q c)", p=patch_size, q=patch_size)


def unpatchify(
    patches: Tensor, patch_size: int, grid_size: tuple[int, int] | None = None, channels: int | None = None
) -> Tensor:
    """Patches [N, L, p*p*C] -> images [N, C, h*p, w*p]; the grid defaults to square, C to D / p^2."""
    _, length, dim = patches.shape
    if grid_size is None:
        side = math.isqrt(length)
        if side * side != length:
            raise ValueError(f"{length} patches do not form a square grid; pass grid_size=(h, w)")
        grid_size = (side, side)
    if grid_size[0] * grid_size[1] != length:
        raise ValueError(f"grid {grid_size} does not hold {length} patches")
    if channels is None:
        if dim % (patch_size * patch_size):
            raise ValueError(f"patch dimension {dim} is not a multiple of patch_size^2 = {patch_size ** 2}")
        channels = dim // (patch_size * patch_size)
    if dim != patch_size * patch_size * channels:
        raise ValueError(f"patch dimension {dim} != patch_size^2 x channels = {patch_size ** 2 * channels}")
    # [N, h*w, p*p*C] -> [N, C, h*p, w*p]
    return rearrange(
        patches, "n (h w) (p q c) -> n c (h p) (w q)", h=grid_size[0], w=grid_size[1], p=patch_size, q=patch_size
    )


# ---------------------------------------------------------------------------------------------
# MAE: per-sample random masking of tokens (He et al. 2022, Sec. 3 "Masking")


def random_masking(
    x: Tensor, mask_ratio: float, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Keep exactly round(L * (1 - mask_ratio)) tokens of each sample, chosen uniformly at random.

    x: [N, L, D] -> (visible [N, K, D] in shuffled order, mask [N, L] with 1 = removed, in the
    original order, ids_restore [N, L]: where each original token sits in the shuffled sequence).
    Pass `generator` (on any device) for fixed masks, e.g. the same figures every evaluation.
    """
    n, length, dim = x.shape
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must lie in [0, 1), got {mask_ratio}")
    keep = round(length * (1.0 - mask_ratio))
    if keep < 1:
        raise ValueError(f"mask_ratio {mask_ratio} keeps no token of {length}; lower it")
    device = generator.device if generator is not None else x.device
    noise = torch.rand(n, length, generator=generator, device=device).to(x.device)  # [N, L]
    ids_shuffle = noise.argsort(dim=1)  # ascending: the K smallest noises are kept
    ids_restore = ids_shuffle.argsort(dim=1)  # inverse permutation, [N, L]
    ids_keep = ids_shuffle[:, :keep]  # [N, K]
    visible = x.gather(1, ids_keep.unsqueeze(-1).expand(-1, -1, dim))  # [N, K, D]
    mask = torch.ones(n, length, device=x.device, dtype=x.dtype)
    mask[:, :keep] = 0  # in shuffled order: kept first
    mask = mask.gather(1, ids_restore)  # back to the original order, [N, L]
    return visible, mask, ids_restore


# ---------------------------------------------------------------------------------------------
# SimMIM: random masks of mask_patch_size blocks (Xie et al. 2022, Sec. 3.1), made per sample
# in the data pipeline (CPU workers), upsampled to the model's patch grid.


# A layout needs at least a 2 x 2 grid of blocks: below 4 blocks ceil(ratio x blocks) is 1.0 of the
# image at 1 or 2 blocks and 2/3 at 3 (ratio 0.6), i.e. the realised ratio misses the asked one by
# >= 1/3, and at most 3 distinct masks exist, so there is hardly a pretext task left. (SimMIM's own
# layouts have 36 and 49 blocks.)
MIN_MASK_BLOCKS = 4


def valid_mask_patch_sizes(image_size: tuple[int, int], patch_size: int) -> list[int]:
    """Mask block sizes that are multiples of the model patch and divide both image sides."""
    return [s for s in range(patch_size, min(image_size) + 1, patch_size) if all(side % s == 0 for side in image_size)]


def _num_blocks(image_size: tuple[int, int], mask_patch_size: int) -> int:
    return (image_size[0] // mask_patch_size) * (image_size[1] // mask_patch_size)


def default_mask_patch_size(image_size: int | tuple[int, int], patch_size: int) -> int:
    """The block side SimMIM uses relative to its image: 32 px at 192 px (6 x 6 blocks; at 224 px, 7 x 7),
    i.e. the valid size (multiple of the patch, dividing the image, >= MIN_MASK_BLOCKS blocks) closest
    to image side / 6, the smaller on a tie.
    """
    image_size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    usable = [s for s in valid_mask_patch_sizes(image_size, patch_size) if _num_blocks(image_size, s) >= MIN_MASK_BLOCKS]
    if not usable:
        raise ConfigError(
            f"SimMIM cannot lay out {MIN_MASK_BLOCKS} mask blocks on a {image_size[0]}x{image_size[1]} image of "
            f"{patch_size} px patches; use a larger data.image_size (and backbone.kwargs.img_size) or a smaller "
            "backbone.kwargs.patch_size."
        )
    return min(usable, key=lambda s: abs(s - min(image_size) / 6))


class SimMIMMaskGenerator:
    """Draws [h, w] bool masks on the model's patch grid: ceil(ratio * blocks) blocks of
    `mask_patch_size` pixels are masked (True), with torch's global RNG unless given a generator.
    `mask_patch_size` None: `default_mask_patch_size` (about a sixth of the image side).
    """

    def __init__(
        self, image_size: int | tuple[int, int], mask_patch_size: int | None, model_patch_size: int, mask_ratio: float
    ) -> None:
        image_size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        if not 0.0 < mask_ratio < 1.0:
            raise ConfigError(f"method.mask_ratio must lie in (0, 1), got {mask_ratio}")
        if mask_patch_size is None:
            mask_patch_size = default_mask_patch_size(image_size, model_patch_size)
        if mask_patch_size % model_patch_size or any(side % mask_patch_size for side in image_size):
            valid = valid_mask_patch_sizes(image_size, model_patch_size)
            raise ConfigError(
                f"method.mask_patch_size={mask_patch_size} must be a multiple of the model's patch size "
                f"({model_patch_size}) and divide the image size {image_size[0]}x{image_size[1]}; "
                f"valid values here: {', '.join(map(str, valid))}"
            )
        num_blocks = _num_blocks(image_size, mask_patch_size)
        num_masked = math.ceil(num_blocks * mask_ratio)  # as SimMIM's MaskGenerator
        if num_blocks < MIN_MASK_BLOCKS:
            smaller = [s for s in valid_mask_patch_sizes(image_size, model_patch_size) if _num_blocks(image_size, s) >= MIN_MASK_BLOCKS]
            raise ConfigError(
                f"method.mask_patch_size={mask_patch_size} cuts the {image_size[0]}x{image_size[1]} image into "
                f"{num_blocks} block(s); SimMIM needs at least {MIN_MASK_BLOCKS} to hide some and show others. "
                f"Leave method.mask_patch_size unset (about image side / 6) or use one of: {', '.join(map(str, smaller)) or 'none'}."
            )
        if num_masked >= num_blocks:
            raise ConfigError(
                f"method.mask_ratio={mask_ratio} masks ceil({mask_ratio} x {num_blocks}) = {num_masked} of the "
                f"{num_blocks} blocks, leaving none visible; lower method.mask_ratio below {(num_blocks - 1) / num_blocks:.3g} "
                "or use a smaller method.mask_patch_size (more blocks)."
            )
        self.image_size = image_size
        self.mask_patch_size = mask_patch_size
        self.scale = mask_patch_size // model_patch_size  # model patches per mask block side
        self.blocks = (image_size[0] // mask_patch_size, image_size[1] // mask_patch_size)
        self.num_blocks = num_blocks
        self.num_masked = num_masked
        self.mask_ratio = mask_ratio

    def __call__(self, generator: torch.Generator | None = None) -> Tensor:
        chosen = torch.randperm(self.num_blocks, generator=generator)[: self.num_masked]
        mask = torch.zeros(self.num_blocks, dtype=torch.bool)
        mask[chosen] = True
        mask = mask.view(self.blocks)  # [h / s, w / s]
        # each block covers s x s model patches: [h / s, w / s] -> [h, w]
        return mask.repeat_interleave(self.scale, 0).repeat_interleave(self.scale, 1)

    def __repr__(self) -> str:
        return (
            f"SimMIMMaskGenerator(image_size={self.image_size}, mask_patch_size={self.mask_patch_size}, "
            f"mask_ratio={self.mask_ratio}, masked blocks {self.num_masked}/{self.num_blocks})"
        )


def block_mask(grid: tuple[int, int], num_masked: float, *, aspect: tuple[float, float] = (0.3, 1 / 0.3),
               generator: torch.Generator | None = None) -> Tensor:
    """BEiT's blockwise mask as iBOT draws it (bytedance/ibot loader.py ImageFolderMask, pred_shape 'block'): add
    random rectangles of >= (min(h, w) // 3)^2 patches, log-uniform aspect, until about `num_masked` patches are
    masked (a rectangle may not add more than are left; 10 tries per rectangle). [h, w] bool, True = masked."""
    h, w = grid
    mask = torch.zeros(h, w, dtype=torch.bool)
    low, log_aspect = (min(h, w) // 3) ** 2, (math.log(aspect[0]), math.log(aspect[1]))
    count = 0
    while count < num_masked:
        left_to_mask, delta = num_masked - count, 0
        for _ in range(10):
            u = torch.rand(4, generator=generator, dtype=torch.float64).tolist()
            area = low + (left_to_mask - low) * u[0]
            ratio = math.exp(log_aspect[0] + (log_aspect[1] - log_aspect[0]) * u[1])
            bh, bw = int(round(math.sqrt(area * ratio))), int(round(math.sqrt(area / ratio)))
            if bw < w and bh < h:
                top, left = int(u[2] * (h - bh + 1)), int(u[3] * (w - bw + 1))
                box = mask[top : top + bh, left : left + bw]
                new = bh * bw - int(box.sum())
                if 0 < new <= left_to_mask:
                    box.fill_(True)
                    delta = new
            if delta > 0:
                break
        if delta == 0:
            break
        count += delta
    return mask


class WithMask:
    """View transform wrapper: one image -> [view, mask]; a class so DataLoader workers can pickle it.

    ViewDataset seeds torch's RNG per (seed, epoch, index) around the call, so masks are reproducible.
    """

    def __init__(self, transform: Callable[[Any], Any], mask_generator: SimMIMMaskGenerator) -> None:
        views = getattr(transform, "num_views", 1)
        if views != 1:
            raise ValueError(f"SimMIM trains on one view per image, got num_views={views}; set data.num_views=1")
        self.transform = transform
        self.mask_generator = mask_generator

    def __call__(self, image: Any) -> list[Tensor]:
        view = self.transform(image)
        if isinstance(view, (list, tuple)):
            (view,) = view
        return [view, self.mask_generator()]

    def __repr__(self) -> str:
        return f"WithMask({self.transform!r},\n  {self.mask_generator!r})"


# ---------------------------------------------------------------------------------------------
# reconstruction losses on masked positions only (computed in float32 under autocast)


def masked_mse(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """MAE's loss: mean over masked patches of the per-patch mean squared error.

    pred, target: [N, L, P]; mask: [N, L] with 1 = masked. Visible patches contribute nothing.
    """
    per_patch = (pred.float() - target.float()).pow(2).mean(dim=-1)  # [N, L]
    mask = mask.float()
    return (per_patch * mask).sum() / mask.sum().clamp_min(1.0)


def masked_l1(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """SimMIM's loss: L1 summed over masked pixels, divided by masked pixels x channels.

    pred, target: [N, C, H, W]; mask: [N, H, W] pixel mask with 1 = masked.
    """
    channels = pred.shape[1]
    mask = mask.float().unsqueeze(1)  # [N, 1, H, W]
    per_pixel = (pred.float() - target.float()).abs()  # [N, C, H, W]
    return (per_pixel * mask).sum() / (mask.sum().clamp_min(1.0) * channels)


# ---------------------------------------------------------------------------------------------
# timm VisionTransformer at token level: MAE and SimMIM run its submodules in their own order


def check_vit(encoder: nn.Module, method: str) -> VisionTransformer:
    """The backbone as a timm VisionTransformer that masked image modelling can drive, or a clear error."""
    if not isinstance(encoder, VisionTransformer):
        raise ValueError(
            f"{method} needs a timm VisionTransformer backbone (e.g. vit_tiny_patch4, vit_base_patch16_224), "
            f"got {type(encoder).__name__}; set backbone.name to a ViT"
        )
    if encoder.dynamic_img_size:
        raise ValueError(f"{method} works on a fixed token grid; drop backbone.kwargs.dynamic_img_size")
    if not isinstance(encoder.fc_norm, nn.Identity) or encoder.attn_pool is not None:
        # they act on pooled features only, so the masked objective never trains them (and DDP stops on unused ones)
        raise ValueError(
            f"{method} trains the ViT's token path; this one pools with fc_norm/attn_pool after it "
            "(global_pool='avg'/'map'). Add fc_norm: false to backbone.kwargs (norm before pooling) or use global_pool: token"
        )
    vit_patch_grid(encoder)  # raises on non-square patches
    return encoder


def vit_patch_grid(vit: VisionTransformer) -> tuple[int, int, int]:
    """(grid height, grid width, square patch size) of the ViT's patch embedding."""
    patch = tuple(vit.patch_embed.patch_size)
    if patch[0] != patch[1]:
        raise ValueError(f"masked image modelling needs square patches, got {patch}; set backbone.kwargs.patch_size")
    grid_h, grid_w = vit.patch_embed.grid_size
    return int(grid_h), int(grid_w), int(patch[0])


def prefix_tokens(vit: VisionTransformer, n: int) -> Tensor | None:
    """Class (and register) tokens with their position embeddings: [N, P, D], or None when P = 0."""
    tokens = [t.expand(n, -1, -1) for t in (vit.cls_token, vit.reg_token) if t is not None]
    if not tokens:
        return None
    prefix = torch.cat(tokens, dim=1)  # [N, P, D]
    if vit.pos_embed is not None and not vit.no_embed_class:
        prefix = prefix + vit.pos_embed[:, : prefix.shape[1]]
    return prefix


def patch_pos_embed(vit: VisionTransformer) -> Tensor | None:
    """The patch tokens' part of the ViT's position embedding: [1, L, D] (None if it has none)."""
    if vit.pos_embed is None:
        return None
    skip = 0 if vit.no_embed_class else vit.num_prefix_tokens
    return vit.pos_embed[:, skip:]


def sincos_pos_embed(grid_size: tuple[int, int], dim: int, num_prefix_tokens: int = 0) -> Tensor:
    """Fixed 2-D sin-cos position embeddings [1, P + h*w, D] (MAE), zeros for the P prefix tokens."""
    if dim % 4:
        raise ValueError(f"2-D sin-cos position embeddings need an embedding size divisible by 4, got {dim}")
    table = build_sincos2d_pos_embed(list(grid_size), dim=dim)  # [h*w, D], row-major like patchify
    return torch.cat([table.new_zeros(num_prefix_tokens, dim), table]).unsqueeze(0)
