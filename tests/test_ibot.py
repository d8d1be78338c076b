"""iBOT: block masks, the masked patch loss against a naive loop, the step against an independent formulation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from selfsup.backbones import create_backbone
from selfsup.config import ConfigError, from_dict
from selfsup.export import load_encoder, save_encoder
from selfsup.losses import masked_self_distillation, self_distillation
from selfsup.masking import block_mask
from selfsup.methods.ibot import IBOT, IBOTConfig
from tests.conftest import TINY_RESNET

N = 3


def tiny_vit():
    return create_backbone("vit_tiny_patch4", img_size=16, depth=1, embed_dim=16, num_heads=2, dynamic_img_size=True)


def tiny_ibot(**overrides) -> IBOT:
    torch.manual_seed(0)
    cfg = {"out_dim": 32, "patch_out_dim": 32, "hidden_dim": 32, "bottleneck_dim": 8, **overrides}
    return IBOT(tiny_vit(), IBOTConfig(**cfg))


def crops(seed: int, local: int = 2) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(N, 3, s, s, generator=g) for s in [16, 16] + [8] * local]


def test_masked_loss_equals_a_naive_loop_over_crops_images_and_masked_tokens() -> None:
    g = torch.Generator().manual_seed(0)
    student = torch.randn(2, 3, 5, 7, generator=g, dtype=torch.float64)
    teacher = torch.randn(2, 3, 5, 7, generator=g, dtype=torch.float64).softmax(-1)
    mask = torch.rand(2, 3, 5, generator=g) < 0.5
    mask[0, 1] = False  # an unmasked image counts 0 in its crop's mean
    total = 0.0
    for c in range(2):
        crop = 0.0
        for i in range(3):
            tokens = [-(teacher[c, i, t] * F.log_softmax(student[c, i, t] / 0.1, -1)).sum() for t in range(5) if mask[c, i, t]]
            crop = crop + (sum(tokens) / len(tokens) if tokens else 0.0)
        total = total + crop / 3
    assert_close(masked_self_distillation(student, teacher, mask, 0.1), total / 2)


def test_block_masks_cover_about_the_asked_patches_in_rectangles() -> None:
    g = torch.Generator().manual_seed(0)
    for target in (5.0, 12.5, 24.0):
        counts = [int(block_mask((7, 7), target, generator=g).sum()) for _ in range(50)]
        assert all(c <= target for c in counts)  # never more than asked
        assert min(counts) >= 4 and sum(counts) / len(counts) > 0.7 * target  # blocks of >= (7 // 3)^2 = 4
    assert not block_mask((7, 7), 0.0, generator=g).any()


def test_masks_follow_the_papers_ratio_draw() -> None:
    model = tiny_ibot()
    torch.manual_seed(0)
    ratios = model.draw_masks(400, (7, 7)).flatten(1).float().mean(1)  # [n]
    unmasked = (ratios == 0).float().mean().item()
    assert abs(unmasked - 0.5) < 0.1  # pred_ratio [0, 0.3]: half the images without a mask
    masked = ratios[ratios > 0]
    assert masked.min() >= 4 / 49 - 1e-6 and masked.max() <= 0.5 + 1e-6 and abs(masked.mean() - 0.3) < 0.05


def test_step_is_cls_distillation_plus_masked_patch_distillation_of_the_unmasked_teacher(monkeypatch) -> None:
    model = tiny_ibot(freeze_last_layer=0.0)
    model.on_fit_start(0, 10, 5)
    model.center.copy_(torch.randn(1, 32))
    model.patch_center.copy_(torch.randn(1, 32))
    with torch.no_grad():
        model.mask_token.copy_(torch.randn(1, 16))
    views = crops(1)
    masks = torch.rand(2 * N, 4, 4, generator=torch.Generator().manual_seed(3)) < 0.4  # [G*N, h, w]
    monkeypatch.setattr(model, "draw_masks", lambda n, grid: masks)
    center, patch_center = model.center.clone(), model.patch_center.clone()
    out = model((views, None))

    vit, teacher = model.backbone, model.teacher_backbone
    with torch.no_grad():
        # independent: mask by hand on the patch embedding, then timm's own path from _pos_embed on
        x = torch.cat(views[:2])
        emb = vit.patch_embed(x)  # [G*N, 4, 4, D] (dynamic_img_size)
        emb = emb * (~masks)[..., None] + model.mask_token * masks[..., None]
        tokens = vit.norm(vit.blocks(vit.norm_pre(vit._pos_embed(emb))))  # [G*N, 1 + 16, D]
        s_cls = torch.cat([model.head(tokens[:, 0]), model.head(torch.cat([vit(v) for v in views[2:]]))]).view(4, N, 32)
        s_patch = model.head(tokens[:, 1:].reshape(-1, 16)).view(2, N, 16, 32)
        t_tokens = teacher.forward_features(x)
        t_cls = model.teacher_head(t_tokens[:, 0]).view(2, N, 32)
        t_patch = model.teacher_head(t_tokens[:, 1:].reshape(-1, 16)).view(2, N, 16, 32)
    cls_loss = self_distillation(s_cls, ((t_cls - center) / 0.04).softmax(-1), 0.1)
    patch_loss = masked_self_distillation(s_patch, ((t_patch - patch_center) / 0.04).softmax(-1), masks.view(2, N, 16), 0.1)
    assert_close(out.metrics["cls_loss"], cls_loss)
    assert_close(out.metrics["patch_loss"], patch_loss)
    assert_close(out.loss.detach(), cls_loss + patch_loss)
    assert_close(model.patch_center, 0.9 * patch_center + 0.1 * t_patch.mean(dim=(0, 1, 2)))
    out.loss.backward()
    assert model.mask_token.grad.abs().sum() > 0 and all(p.grad is None for p in model.teacher_backbone.parameters())


def test_separate_patch_prototypes_and_config_errors(tmp_path) -> None:
    model = tiny_ibot(shared_head=False, patch_out_dim=24)
    assert model.head.patch_weight_v.shape == (24, 8) and model.patch_center.shape == (1, 24)
    out = model((crops(0, local=0), None))
    out.loss.backward()
    assert model.head.patch_weight_v.grad is not None and torch.isfinite(out.loss)
    assert tiny_ibot().head.patch_weight_v is None  # shared: the [CLS] prototypes
    with pytest.raises(ConfigError, match="needs a ViT backbone"):
        IBOT(create_backbone(TINY_RESNET["name"], **TINY_RESNET["kwargs"]), IBOTConfig())
    with pytest.raises(ConfigError, match="patch_out_dim .* must equal method.out_dim"):
        from_dict({"method": {"name": "ibot", "patch_out_dim": 100}})
    with pytest.raises(ConfigError, match="mask_ratio 0.3 \\+- 0.4"):
        from_dict({"method": {"name": "ibot", "mask_ratio": [0.3], "mask_ratio_var": [0.4]}})
    teacher = tiny_ibot(export="teacher")
    assert teacher.encoder is teacher.teacher_backbone
    save_encoder(teacher.encoder, tmp_path / "encoder", method="ibot", data={"image_size": 16})
    loaded, _ = load_encoder(tmp_path / "encoder")
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(teacher.encoder.eval()(x), loaded.eval()(x))
    optim = from_dict({"method": {"name": "ibot"}, "backbone": {"name": "vit_small_patch4"}}).optim
    assert (optim.name, optim.lr, optim.weight_decay, optim.weight_decay_end) == ("adamw", 5e-4, 0.04, 0.4)
