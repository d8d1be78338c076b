"""Fine-tuning: parameter groups per mode checked against formulas written from parameter names, the
frozen backbone left bit-identical by real training, and the supervised task's options."""

import re

import pytest
import torch

from selfsup.backbones import create_backbone
from selfsup.config import ConfigError, from_dict
from selfsup.data import SyntheticDataset
from selfsup.engine import fit, make_accelerator, make_loader
from selfsup.evaluation import ClassifierEvaluator
from selfsup.finetune import Classifier, SupervisedTask, build_finetune_optimizer, with_drop_path
from selfsup.optim import build_scheduler
from selfsup.sampling import ViewDataset
from selfsup.transforms import build_eval_transform, build_views
from tests.conftest import TINY_RESNET

LR, WD = 0.01, 0.05


def finetune_cfg(tmp_path, mode, **optim):
    return from_dict({
        "data": {"batch_size": 16, "num_workers": 0, "image_size": 16},
        "optim": {"name": "adamw", "lr": LR, "lr_scaling": "none", "weight_decay": WD, "warmup_epochs": 0, **optim},
        "train": {"epochs": 1, "max_steps": 4, "log_every_steps": 1, "output_dir": str(tmp_path), "run_name": "ft",
                  "checkpoint_every_steps": 100},
        "finetune": {"mode": mode, "backbone_lr_scale": 0.1},
        "eval": {"at_end": False},
    })


def vit_tiny():  # ViT-Tiny: depth 12, width 192; 4 px patches on 16 px images keep it quick
    return create_backbone("vit_tiny_patch4", img_size=16)


def tiny_resnet():
    return create_backbone(TINY_RESNET["name"], **TINY_RESNET["kwargs"])


def scheduled_lrs(model, optimizer, cfg):
    """lr of every parameter name as the schedule sets it for the first update (timm applies lr_scale there)."""
    scheduler = build_scheduler(optimizer, cfg.optim, total_steps=10, warmup_steps=0)
    scheduler.step_update(0)
    names = {id(p): n for n, p in model.named_parameters()}
    lrs, decays = {}, {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            lrs[names[id(p)]] = group["lr"]
            decays[names[id(p)]] = group["weight_decay"]
    head_lr = lrs["head.fc.weight"]
    return lrs, decays, head_lr


def vit_layer_id(name: str, depth: int) -> int:
    """MAE's numbering from the name (util/lr_decay.py get_layer_id_for_vit): the final norm sits with the
    head at L + 1 (scale 1.0), where timm's own grouping keeps it with the last block."""
    if re.match(r"backbone\.(cls_token|pos_embed|patch_embed|reg_token)", name):
        return 0
    if m := re.match(r"backbone\.blocks\.(\d+)\.", name):
        return int(m.group(1)) + 1
    assert name.startswith(("head.", "backbone.norm.", "backbone.fc_norm.")), name
    return depth + 1


def resnet_layer_id(name: str, blocks_per_stage=(2, 2, 2, 2)) -> int:
    if re.match(r"backbone\.(conv1|bn1)\.", name):
        return 0
    if m := re.match(r"backbone\.layer(\d)\.(\d+)\.", name):
        stage, block = int(m.group(1)), int(m.group(2))
        return sum(blocks_per_stage[: stage - 1]) + block + 1
    assert name.startswith("head."), name
    return sum(blocks_per_stage) + 1


def expects_no_decay(name: str, param) -> bool:
    return param.ndim <= 1 or name.endswith((".cls_token", ".pos_embed"))


@pytest.mark.parametrize("arch", ["vit", "resnet"])
def test_layer_decay_scales_follow_the_formula(tmp_path, arch):
    decay = 0.65
    backbone, layer_id, depth = (vit_tiny(), vit_layer_id, 12) if arch == "vit" else (tiny_resnet(), resnet_layer_id, 8)
    model = Classifier(backbone, num_classes=10)
    cfg = finetune_cfg(tmp_path, "layer_decay", layer_decay=decay)
    optimizer = build_finetune_optimizer(model, cfg, LR)
    lrs, decays, head_lr = scheduled_lrs(model, optimizer, cfg)
    params = dict(model.named_parameters())
    assert set(lrs) == set(params)  # every parameter, once
    ids = {}
    for name, lr in lrs.items():
        ids[name] = layer_id(name, depth) if arch == "vit" else layer_id(name)
        assert lr == pytest.approx(head_lr * decay ** (depth + 1 - ids[name]), rel=1e-12), name
        assert decays[name] == (0.0 if expects_no_decay(name, params[name]) else WD), name
    assert sorted(set(ids.values())) == list(range(depth + 2))  # stem, every block, head
    assert head_lr == pytest.approx(LR)  # the head is scale 1


@pytest.mark.parametrize("name, kwargs", [
    ("convnext_atto", {}),
    ("swin_tiny_patch4_window7_224", {"embed_dim": 16, "depths": (1, 1, 2, 1), "num_heads": (1, 1, 1, 1),
                                      "img_size": 32, "window_size": 4}),
])
def test_layer_decay_groups_other_timm_families_by_depth(tmp_path, name, kwargs):
    """ConvNeXt and Swin: scales never fall with depth, the stem is lowest, the head (and final norm) at 1."""
    decay = 0.8
    model = Classifier(create_backbone(name, **kwargs), num_classes=5)
    cfg = finetune_cfg(tmp_path, "layer_decay", layer_decay=decay)
    lrs, _, head_lr = scheduled_lrs(model, build_finetune_optimizer(model, cfg, LR), cfg)
    scales = [lrs[n] / head_lr for n, _ in model.named_parameters()]  # in definition (= depth) order
    assert all(a <= b * (1 + 1e-12) for a, b in zip(scales, scales[1:]))
    levels = sorted(set(round(s, 12) for s in scales))
    assert len(levels) > 4 and levels[-1] == pytest.approx(1.0)
    assert scales[0] == pytest.approx(decay ** (len(levels) - 1))  # one decay step per level, none skipped
    assert all(lrs[n] == head_lr for n, _ in model.named_parameters() if n.startswith(("head.", "backbone.head.")))


def test_discriminative_applies_the_backbone_factor_exactly(tmp_path):
    model = Classifier(vit_tiny(), num_classes=10)
    cfg = finetune_cfg(tmp_path, "discriminative")
    optimizer = build_finetune_optimizer(model, cfg, LR)
    lrs, decays, head_lr = scheduled_lrs(model, optimizer, cfg)
    params = dict(model.named_parameters())
    assert set(lrs) == set(params)
    for name, lr in lrs.items():
        assert lr == (head_lr * 0.1 if name.startswith("backbone.") else head_lr), name
        assert decays[name] == (0.0 if expects_no_decay(name, params[name]) else WD), name


def test_full_mode_has_one_lr_and_no_decay_on_norms_and_tokens(tmp_path):
    model = Classifier(vit_tiny(), num_classes=10)
    cfg = finetune_cfg(tmp_path, "full")
    lrs, decays, head_lr = scheduled_lrs(model, build_finetune_optimizer(model, cfg, LR), cfg)
    params = dict(model.named_parameters())
    assert set(lrs.values()) == {head_lr}
    assert decays["backbone.cls_token"] == decays["backbone.pos_embed"] == decays["backbone.blocks.0.norm1.weight"] == 0.0
    assert all(decays[n] == (0.0 if expects_no_decay(n, p) else WD) for n, p in params.items())


def synthetic_images(cfg, augment: bool, n=64):
    base = SyntheticDataset(n, image_size=16, num_classes=4, seed=0)
    if augment:
        transform = build_views("finetune", image_size=16, mean=(0.26,) * 3, std=(0.21,) * 3, num_views=1)
    else:
        transform = build_eval_transform(image_size=16, mean=(0.26,) * 3, std=(0.21,) * 3)
    return ViewDataset(base, transform, seed=0)


def test_frozen_backbone_stays_bit_identical_through_training(tmp_path):
    cfg = finetune_cfg(tmp_path, "frozen")
    torch.manual_seed(0)
    model = Classifier(tiny_resnet(), num_classes=4, freeze_backbone=True)
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    head_before = model.head.fc.weight.detach().clone()
    optimizer = build_finetune_optimizer(model, cfg, LR)
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert not any(id(p) in in_optimizer for p in model.backbone.parameters())
    assert {id(p) for p in model.head.parameters()} <= in_optimizer

    task = SupervisedTask(model, 4)
    loader = make_loader(synthetic_images(cfg, augment=True), cfg.data, seed=0)
    (tmp_path / "ft").mkdir()
    fit(task, loader, cfg, make_accelerator(cfg, tmp_path / "ft"), run_dir=tmp_path / "ft", optimizer=optimizer)

    assert not model.backbone.training and model.head.training  # the engine's train() left BN in eval
    after = model.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and BN running statistics
    assert not torch.equal(head_before, model.head.fc.weight)


def test_frozen_mode_refuses_a_trainable_backbone_and_layer_decay_needs_its_rate(tmp_path):
    with pytest.raises(ValueError, match="freeze_backbone"):
        build_finetune_optimizer(Classifier(tiny_resnet(), 4), finetune_cfg(tmp_path, "frozen"), LR)
    with pytest.raises(ConfigError, match="--layer-decay"):
        build_finetune_optimizer(Classifier(tiny_resnet(), 4), finetune_cfg(tmp_path, "layer_decay"), LR)
    with pytest.raises(ConfigError, match="only applies with --mode layer_decay"):
        build_finetune_optimizer(Classifier(tiny_resnet(), 4), finetune_cfg(tmp_path, "full", layer_decay=0.7), LR)
    with pytest.raises(ConfigError, match="Did you mean 'layer_decay'"):
        from_dict({"finetune": {"mode": "layer_decy"}})


def test_mixup_label_smoothing_and_ema_train_and_evaluate(tmp_path):
    cfg = finetune_cfg(tmp_path, "full")
    torch.manual_seed(0)
    model = Classifier(with_drop_path(tiny_resnet(), 0.1), num_classes=4)
    task = SupervisedTask(model, 4, label_smoothing=0.1, mixup=0.8, cutmix=1.0, ema_decay=0.9)
    assert all(not p.requires_grad for p in task.ema.parameters())
    optimizer = build_finetune_optimizer(model, cfg, LR)
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert not any(id(p) in in_optimizer for p in task.ema.parameters())

    evaluate = ClassifierEvaluator(synthetic_images(cfg, augment=False, n=16), batch_size=8)
    (tmp_path / "ft").mkdir()
    result = fit(task, make_loader(synthetic_images(cfg, augment=True), cfg.data, seed=0), cfg,
                 make_accelerator(cfg, tmp_path / "ft"), run_dir=tmp_path / "ft", evaluate=evaluate, optimizer=optimizer)
    assert result.steps == 4 and int(task.ema_updates) == 4
    record = evaluate(task)
    assert {"top1", "top5", "ema_top1", "ema_top5"} <= set(record)
    # EMA = running average: it moved from the start but is not the live weights
    live, ema = model.head.fc.weight, task.ema.module.head.fc.weight
    assert not torch.equal(live, ema)


def test_drop_path_rebuild_keeps_the_weights():
    torch.manual_seed(0)
    plain = tiny_resnet()
    dropped = with_drop_path(plain, 0.2)
    x = torch.randn(2, 3, 16, 16)
    plain.eval(), dropped.eval()
    with torch.no_grad():
        assert torch.equal(plain(x), dropped(x))  # stochastic depth is the identity at eval
    assert dropped.backbone_kwargs["drop_path_rate"] == 0.2


def test_a_rate_of_zero_removes_the_stochastic_depth_an_encoder_was_pretrained_with():
    torch.manual_seed(0)
    pretrained = create_backbone("vit_tiny_patch4", img_size=16, depth=2, embed_dim=16, num_heads=2, drop_path_rate=0.5)
    plain = with_drop_path(pretrained, 0.0)
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(plain.train()(x), plain(x))  # train mode: no path dropped any more
        assert torch.equal(plain(x), pretrained.eval()(x))
    assert plain.backbone_kwargs["drop_path_rate"] == 0.0
    assert with_drop_path(pretrained, 0.5) is pretrained  # already at the asked rate: nothing to rebuild


def test_label_smoothing_loss_matches_its_definition():
    task = SupervisedTask(torch.nn.Identity(), 3, label_smoothing=0.2)
    logits, targets = torch.randn(5, 3), torch.tensor([0, 1, 2, 1, 0])
    smooth = torch.full((5, 3), 0.2 / 3)
    smooth[torch.arange(5), targets] += 0.8
    expected = -(smooth * logits.log_softmax(1)).sum(1).mean()
    assert task((logits, targets)).loss.item() == pytest.approx(expected.item(), rel=1e-6)
