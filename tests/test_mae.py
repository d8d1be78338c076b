"""MAE: visible-only encoder, loss on removed patches only, frozen sin-cos positions, end to end + export."""

from __future__ import annotations

import math

import pytest
import timm
import torch
from safetensors.torch import load_file
from torch.testing import assert_close

import pretrain
from selfsup.backbones import create_backbone
from selfsup.config import OptimConfig, from_dict
from selfsup.masking import patchify, sincos_pos_embed
from selfsup.methods.mae import MAE, MAEConfig, decoder_defaults
from selfsup.optim import build_optimizer
from tests.conftest import read_losses, tiny_config_dict, write_config

TINY_VIT = {"img_size": 16, "embed_dim": 32, "depth": 2, "num_heads": 2}


def tiny_mae(**cfg) -> MAE:
    torch.manual_seed(0)
    return MAE(create_backbone("vit_tiny_patch4", **TINY_VIT), MAEConfig(**cfg))


@pytest.mark.parametrize("ratio", [0.75, 0.5, 0.9])
def test_encoder_sees_visible_tokens_plus_the_class_token(ratio):
    model = tiny_mae(mask_ratio=ratio)
    latent, mask, ids_restore = model.forward_encoder(torch.randn(3, 3, 16, 16), ratio)
    visible = round(16 * (1 - ratio))
    assert latent.shape == (3, visible + 1, 32)
    assert mask.shape == ids_restore.shape == (3, 16)
    assert mask.sum(1).tolist() == [16 - visible] * 3


def test_encoder_output_ignores_the_pixels_of_removed_patches():
    model = tiny_mae().eval()
    images = torch.randn(2, 3, 16, 16)
    latent, mask, _ = model.forward_encoder(images, 0.75, torch.Generator().manual_seed(1))
    removed = mask.view(2, 1, 4, 1, 4, 1).expand(2, 3, 4, 4, 4, 4).reshape(2, 3, 16, 16).bool()  # patch -> pixels
    changed = torch.where(removed, torch.randn_like(images) * 5, images)
    again, mask2, _ = model.forward_encoder(changed, 0.75, torch.Generator().manual_seed(1))
    assert torch.equal(mask, mask2)
    assert_close(latent, again)
    poked = images.clone()
    poked[~removed] += 1.0  # a visible pixel change must reach the encoder
    assert not torch.allclose(model.forward_encoder(poked, 0.75, torch.Generator().manual_seed(1))[0], latent)


@pytest.mark.parametrize("norm_pix", [True, False])
def test_loss_ignores_predictions_at_visible_patches(norm_pix):
    model = tiny_mae(norm_pix_loss=norm_pix)
    images = torch.randn(2, 3, 16, 16)
    mask = (torch.rand(2, 16) < 0.75).float()
    mask[:, 0], mask[:, 1] = 1.0, 0.0  # at least one of each
    pred = torch.randn(2, 16, 48)
    loss = model.forward_loss(images, pred, mask)
    visible_changed = torch.where(mask.bool().unsqueeze(-1), pred, torch.randn_like(pred) * 10)
    assert_close(model.forward_loss(images, visible_changed, mask), loss)
    masked_changed = torch.where(mask.bool().unsqueeze(-1), pred + 1.0, pred)
    assert not torch.allclose(model.forward_loss(images, masked_changed, mask), loss)

    # independent formulation: per-patch MSE averaged over removed patches, against (normalised) pixels
    target = patchify(images, 4)
    if norm_pix:
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    terms = [((pred[n, l] - target[n, l]) ** 2).mean() for n in range(2) for l in range(16) if mask[n, l]]
    assert_close(loss, torch.stack(terms).mean())


def test_position_embedding_is_frozen_sincos_and_left_out_of_the_optimizer():
    model = tiny_mae()
    pos = model.encoder.pos_embed
    assert not pos.requires_grad
    assert_close(pos.detach(), sincos_pos_embed((4, 4), 32, num_prefix_tokens=1))
    optimizer = build_optimizer(model, OptimConfig(name="adamw", weight_decay=0.05), lr=1e-3)
    ids = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert id(pos) not in ids and id(model.mask_token) in ids
    decay = {id(p) for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert id(model.mask_token) not in decay and id(model.encoder.cls_token) not in decay
    assert id(model.encoder.blocks[0].attn.qkv.weight) in decay


def test_encoder_is_initialised_as_the_official_code():
    """facebookresearch/mae models_mae.py initialize_weights: xavier-uniform Linear layers (zero bias), the patch
    embedding as a Linear C*p*p -> D, class token N(0, 0.02); timm's ViT default (trunc-normal 0.02 Linear
    weights, torch's conv init, class token 1e-6) would fail each check."""
    torch.manual_seed(0)
    vit = MAE(create_backbone("vit_tiny_patch4", img_size=16), MAEConfig()).encoder  # width 192, 12 blocks

    def check_xavier_uniform(weight, fan_in, fan_out, name):
        bound = math.sqrt(6.0 / (fan_in + fan_out))
        w = weight.detach().flatten()
        assert w.abs().max() <= bound and w.abs().max() > 0.97 * bound, name  # uniform on [-bound, bound]
        assert w.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05), name

    linears = [(n, m) for n, m in vit.named_modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 12 * 4  # qkv, proj, fc1, fc2 per block
    for name, linear in linears:
        check_xavier_uniform(linear.weight, linear.in_features, linear.out_features, name)
        assert not linear.bias.any(), name
    proj = vit.patch_embed.proj.weight  # [192, 3, 4, 4]
    check_xavier_uniform(proj, 3 * 4 * 4, 192, "patch_embed")
    assert vit.cls_token.std().item() == pytest.approx(0.02, rel=0.2)
    norms = [m for m in vit.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert norms and all((m.weight == 1).all() and (m.bias == 0).all() for m in norms)


def test_optim_recipe_is_the_papers():
    cfg = from_dict({"method": {"name": "mae"}, "backbone": {"name": "vit_tiny_patch4"}}).optim
    assert (cfg.name, cfg.lr, cfg.weight_decay, tuple(cfg.betas), cfg.warmup_epochs) == (
        "adamw", 1.5e-4, 0.05, (0.9, 0.95), 40.0)  # main_pretrain.py / PRETRAIN.md: --warmup_epochs 40


def test_decoder_defaults_are_the_papers_for_vit_base_and_scaled_for_small_encoders():
    assert decoder_defaults(MAEConfig(), 768, 12) == (512, 8, 16)  # ViT-B: 512-d, 8 blocks, 16 heads
    assert decoder_defaults(MAEConfig(), 1024, 24) == (512, 8, 16)  # ViT-L
    assert decoder_defaults(MAEConfig(), 192, 12) == (128, 8, 4)  # ViT-Ti
    assert decoder_defaults(MAEConfig(decoder_embed_dim=96, decoder_depth=2, decoder_num_heads=3), 192, 12) == (96, 2, 3)
    with pytest.raises(ValueError, match="not divisible"):
        decoder_defaults(MAEConfig(decoder_embed_dim=100, decoder_num_heads=3), 192, 12)


def test_non_vit_backbones_are_refused_with_a_clear_message():
    with pytest.raises(ValueError, match="needs a timm VisionTransformer"):
        MAE(create_backbone("resnet18_small", channels=[8, 8, 8, 8], stem_width=8), MAEConfig())
    with pytest.raises(ValueError, match="fc_norm: false"):  # pooled-only norm: never trained by the objective
        MAE(create_backbone("vit_tiny_patch4", **TINY_VIT, global_pool="avg"), MAEConfig())
    model = MAE(create_backbone("vit_tiny_patch4", **TINY_VIT, global_pool="avg", fc_norm=False), MAEConfig())
    assert model(([torch.randn(2, 3, 16, 16)], None)).loss.isfinite()


def test_mae_trains_writes_reconstructions_and_exports_timm_loadable_weights(tmp_path):
    cfg = tiny_config_dict(
        tmp_path,
        method={"name": "mae", "mask_ratio": 0.75},
        backbone={"name": "vit_tiny_patch4", "kwargs": TINY_VIT},
        optim={"name": "adamw", "lr": 2e-3, "lr_scaling": "none", "weight_decay": 0.05, "betas": [0.9, 0.95],
               "warmup_epochs": 0},
        train={"max_steps": 12},
        eval={"at_end": True, "max_train_samples": 64, "max_test_samples": 32, "knn_k": 5},
    )
    summary = pretrain.main(["--config", str(write_config(tmp_path, cfg))])
    run_dir = tmp_path / "runs" / "tiny"
    losses = list(read_losses(run_dir).values())
    assert len(losses) == 12 and all(math.isfinite(v) for v in losses)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.05, losses  # falling
    assert "knn_top1" in summary
    assert (run_dir / "reconstruction.png").is_file() and (run_dir / "reconstructions" / "000.png").is_file()
    assert "](reconstruction.png)" in (run_dir / "report.md").read_text()  # the report shows the grid
    assert (run_dir / "report.html").read_text().count('src="data:image/png;base64,') == 3  # loss/lr, kNN, grid

    state = load_file(str(run_dir / "encoder" / "model.safetensors"))
    plain = timm.create_model(f"local-dir:{run_dir / 'encoder'}", pretrained=True)  # timm's Hub format
    assert plain.state_dict().keys() == state.keys()
    assert all(torch.equal(plain.state_dict()[k], v) for k, v in state.items())
    assert_close(plain.pos_embed, sincos_pos_embed((4, 4), 32, num_prefix_tokens=1))  # the export carries them
