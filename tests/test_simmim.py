"""SimMIM: masked patches reach the encoder only as the mask token, L1 on masked pixels, end to end + export."""

from __future__ import annotations

import math

import pytest
import timm
import torch
from safetensors.torch import load_file
from torch.testing import assert_close

import pretrain
from selfsup.backbones import create_backbone
from selfsup.config import ConfigError, from_dict
from selfsup.masking import SimMIMMaskGenerator
from selfsup.methods.simmim import SimMIM, SimMIMConfig
from tests.conftest import read_losses, tiny_config_dict, write_config

TINY_VIT = {"img_size": 16, "embed_dim": 32, "depth": 2, "num_heads": 2}


def tiny_simmim(**cfg) -> SimMIM:
    torch.manual_seed(0)
    return SimMIM(create_backbone("vit_tiny_patch4", **TINY_VIT), SimMIMConfig(**{"mask_patch_size": 8, **cfg}))


def pixel_mask(mask: torch.Tensor, patch: int) -> torch.Tensor:
    """[N, h, w] patch mask -> [N, 1, h*p, w*p] by an explicit loop."""
    n, h, w = mask.shape
    out = torch.zeros(n, 1, h * patch, w * patch, dtype=torch.bool)
    for b in range(n):
        for i in range(h):
            for j in range(w):
                out[b, 0, i * patch : (i + 1) * patch, j * patch : (j + 1) * patch] = mask[b, i, j]
    return out


def test_pixels_inside_masked_patches_do_not_reach_the_encoder_tokens():
    model = tiny_simmim()
    images = torch.randn(3, 3, 16, 16)
    mask = torch.stack([model.mask_generator() for _ in range(3)])  # [3, 4, 4]
    tokens = model.embed(images, mask)
    assert tokens.shape == (3, 1 + 16, 32)  # every token goes in, plus the class token
    removed = pixel_mask(mask, 4).expand_as(images)
    changed = torch.where(removed, torch.randn_like(images) * 10, images)
    assert torch.equal(model.embed(changed, mask), tokens)
    assert torch.equal(model.forward_encoder(changed, mask), model.forward_encoder(images, mask))
    # masked positions hold the mask token + position embedding, whatever the image
    expected = model.mask_token[0, 0] + model.encoder.pos_embed[0, 1:]  # [L, D]
    flat = mask.flatten(1)
    for b in range(3):
        assert_close(tokens[b, 1:][flat[b]], expected[flat[b]])
    poked = images.clone()
    poked[~removed] += 1.0
    assert not torch.equal(model.embed(poked, mask), tokens)


def test_loss_is_l1_over_masked_pixels_and_channels_only():
    model = tiny_simmim()
    images = torch.randn(2, 3, 16, 16)
    mask = torch.stack([model.mask_generator() for _ in range(2)])
    reconstruction = torch.randn(2, 3, 16, 16)
    loss = model.forward_loss(images, reconstruction, mask)
    removed = pixel_mask(mask, 4)
    expected = ((reconstruction - images).abs() * removed).sum() / (removed.sum() * 3)
    assert_close(loss, expected)
    visible_changed = torch.where(removed, reconstruction, torch.randn_like(reconstruction) * 9)
    assert_close(model.forward_loss(images, visible_changed, mask), loss)


def test_head_maps_each_token_to_its_own_patch_pixels():
    model = tiny_simmim()
    z = torch.zeros(1, 32, 4, 4)
    z[0, :, 1, 2] = torch.randn(32)  # only token (1, 2) is non-zero
    out = model.forward_decoder(z) - model.forward_decoder(torch.zeros_like(z))
    assert out.shape == (1, 3, 16, 16)
    inside = torch.zeros(1, 3, 16, 16, dtype=torch.bool)
    inside[..., 4:8, 8:12] = True
    assert out[~inside].abs().max() == 0 and out[inside].abs().max() > 0


def test_mask_patch_size_is_checked_when_the_method_is_built(tmp_path):
    backbone = {"name": "vit_tiny_patch4", "kwargs": {"img_size": 28}}
    cfg = from_dict(tiny_config_dict(tmp_path, method={"name": "simmim", "mask_patch_size": 8}, backbone=backbone))
    with pytest.raises(ValueError, match="valid values here: 4, 28"):
        SimMIM(create_backbone("vit_tiny_patch4", img_size=28), cfg.method)
    with pytest.raises(ConfigError, match="mask_ratio"):
        from_dict(tiny_config_dict(tmp_path, method={"name": "simmim", "mask_ratio": "high"}))


def test_the_default_mask_layout_at_32_px_leaves_visible_blocks_near_the_mask_ratio():
    """`method.name=simmim` alone with a patch-4 ViT at the default 32 px: some blocks masked, some seen."""
    cfg = from_dict({"method": {"name": "simmim"}, "backbone": {"name": "vit_tiny_patch4"}})
    assert cfg.data.image_size == 32
    torch.manual_seed(0)
    model = SimMIM(create_backbone("vit_tiny_patch4", embed_dim=32, depth=1, num_heads=2), cfg.method)
    masks = torch.stack([model.mask_generator() for _ in range(16)])  # [16, 8, 8] on the patch grid
    fraction = masks.float().mean().item()
    assert 0.5 < fraction < 0.7, fraction  # ceil(0.6 x blocks) / blocks, not the whole image
    assert (~masks).flatten(1).any(1).all()  # every sample keeps visible patches


@pytest.mark.parametrize(
    "image, patch, expected",
    [(192, 16, 32), (224, 16, 32), (192, 4, 32), (32, 4, 4), (28, 4, 4), (16, 4, 4), (32, 16, 16)],
)
def test_the_default_mask_block_is_about_a_sixth_of_the_image(image, patch, expected):
    """microsoft/SimMIM masks 32 px blocks at 192 px (6 x 6 blocks, configs/swin_base__100ep) and at 224 px
    (7 x 7, configs/vit_base__800ep); unset, the block side is the valid size closest to image / 6."""
    assert SimMIMMaskGenerator(image, None, patch, 0.6).mask_patch_size == expected


@pytest.mark.parametrize(
    "image, mask_patch_size, mask_ratio, match",
    [(32, 32, 0.6, "method.mask_patch_size=32 .* 1 block"),  # the old default at 32 px: one block, all masked
     (32, 16, 0.9, "method.mask_ratio=0.9 .* none visible"),  # 4 blocks, ceil(3.6) = 4 masked
     (16, 16, 0.6, "method.mask_patch_size=16 .* 1 block")],
)
def test_a_mask_layout_with_no_visible_block_or_too_few_blocks_is_a_config_error(image, mask_patch_size, mask_ratio, match):
    with pytest.raises(ConfigError, match=match):
        SimMIMMaskGenerator(image, mask_patch_size, 4, mask_ratio)
    with pytest.raises(ConfigError, match="method.mask_patch_size"):
        SimMIM(create_backbone("vit_tiny_patch4", embed_dim=32, depth=1, num_heads=2), SimMIMConfig(mask_patch_size=32))


def test_simmim_trains_writes_reconstructions_and_exports_timm_loadable_weights(tmp_path):
    cfg = tiny_config_dict(
        tmp_path,
        method={"name": "simmim", "mask_patch_size": 8, "mask_ratio": 0.6},
        backbone={"name": "vit_tiny_patch4", "kwargs": TINY_VIT},
        optim={"name": "adamw", "lr": 2e-3, "lr_scaling": "none", "weight_decay": 0.05, "warmup_epochs": 0},
        train={"max_steps": 12},
        eval={"at_end": True, "max_train_samples": 64, "max_test_samples": 32, "knn_k": 5},
    )
    summary = pretrain.main(["--config", str(write_config(tmp_path, cfg))])
    run_dir = tmp_path / "runs" / "tiny"
    losses = list(read_losses(run_dir).values())
    assert len(losses) == 12 and all(math.isfinite(v) for v in losses)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.05, losses  # falling
    assert "knn_top1" in summary
    assert (run_dir / "reconstruction.png").is_file()

    state = load_file(str(run_dir / "encoder" / "model.safetensors"))
    plain = timm.create_model(f"local-dir:{run_dir / 'encoder'}", pretrained=True)  # timm's Hub format
    assert plain.state_dict().keys() == state.keys()
    assert all(torch.equal(plain.state_dict()[k], v) for k, v in state.items())


# --- SimMIM on Swin (microsoft/SimMIM models/simmim.py SwinTransformerForSimMIM) -----------------------------
TINY_SWIN = {"img_size": 16, "embed_dim": 8, "depths": [1, 1], "num_heads": [1, 2], "window_size": 4,
             "drop_path_rate": 0.0}  # 2 px patches: an 8x8 grid, one merge to 4x4, stride 4


def tiny_swin_simmim(**cfg) -> SimMIM:
    torch.manual_seed(0)
    backbone = create_backbone("swin_tiny_patch2_window4", **TINY_SWIN)
    return SimMIM(backbone, SimMIMConfig(**{"mask_patch_size": 4, **cfg}))


def test_swin_masked_positions_hold_the_mask_token_after_the_patch_embedding():
    model = tiny_swin_simmim()
    assert (model.patch_size, model.grid_size, model.encoder_stride) == (2, (8, 8), 4)
    images = torch.randn(3, 3, 16, 16)
    mask = torch.stack([model.mask_generator() for _ in range(3)])  # [3, 8, 8] on the patch grid
    x = model.embed_swin(images, mask)  # the first stage's input
    embedded = model.encoder.patch_embed(images)  # [3, 8, 8, 8]: Swin is channels-last
    assert x.shape == embedded.shape == (3, 8, 8, 8)
    for b in range(3):
        assert_close(x[b][mask[b]], model.mask_token[0].expand(int(mask[b].sum()), -1))  # masked: the token
        assert torch.equal(x[b][~mask[b]], embedded[b][~mask[b]])  # visible: the patch embedding
    removed = pixel_mask(mask, 2).expand_as(images)
    changed = torch.where(removed, torch.randn_like(images) * 10, images)
    assert torch.equal(model.forward_encoder(changed, mask), model.forward_encoder(images, mask))
    z = model.forward_encoder(images, mask)
    assert z.shape == (3, model.encoder.num_features, 4, 4)  # after one merge: 2x the width, half the grid
    assert model.forward_decoder(z).shape == images.shape  # 1x1 conv to 4*4*3 channels, PixelShuffle(4)


def test_swin_loss_is_l1_over_masked_pixels_only():
    model = tiny_swin_simmim()
    images = torch.randn(2, 3, 16, 16)
    mask = torch.stack([model.mask_generator() for _ in range(2)])
    reconstruction = torch.randn(2, 3, 16, 16)
    removed = pixel_mask(mask, 2)  # the patch mask at pixel level (simmim.py L118)
    expected = ((reconstruction - images).abs() * removed).sum() / (removed.sum() * 3)
    assert_close(model.forward_loss(images, reconstruction, mask), expected)
    visible_changed = torch.where(removed, reconstruction, torch.randn_like(reconstruction) * 9)
    assert_close(model.forward_loss(images, visible_changed, mask), expected)


def test_a_swin_simmim_step_trains_the_mask_token_and_the_encoder():
    from selfsup.optim import build_optimizer

    model = tiny_swin_simmim()
    cfg = from_dict({"optim": {"name": "adamw", "lr": 1e-3, "weight_decay": 0.05}}).optim
    optimizer = build_optimizer(model, cfg, 1e-3)
    images = torch.randn(4, 3, 16, 16)
    mask = torch.stack([model.mask_generator() for _ in range(4)])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = model(([images, mask], torch.zeros(4)))
    out.loss.backward()
    assert math.isfinite(out.loss.item())
    assert model.mask_token.grad is not None and model.mask_token.grad.abs().sum() > 0
    optimizer.step()
    after = model.state_dict()
    for key in ("mask_token", "encoder.patch_embed.proj.weight", "encoder.layers.1.blocks.0.mlp.fc2.weight", "decoder.0.weight"):
        assert not torch.equal(before[key], after[key]), key
    assert SimMIM.optim_defaults(model.cfg, "swin_tiny_patch2_window4", {})["lr"] == 1e-4  # 2e-4 per 512
