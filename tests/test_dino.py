"""DINO: the loss against a naive loop over view pairs, centre, teacher EMA, schedules, 2 processes, export, resume."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch.testing import assert_close

import pretrain
from selfsup.backbones import create_backbone
from selfsup.checkpoints import list_checkpoints
from selfsup.config import ConfigError, from_dict
from selfsup.export import load_encoder, save_encoder
from selfsup.heads import DINOHead
from selfsup.losses import self_distillation
from selfsup.methods.dino import DINO, DINOConfig
from selfsup.methods.ibot import IBOT, IBOTConfig
from selfsup.momentum import cosine_momentum
from selfsup.optim import build_optimizer, set_weight_decay, weight_decay_at
from tests import crashing_method
from tests.conftest import TINY_RESNET, read_losses, read_metrics, tiny_config_dict, write_config
from tests.multiproc import WORKERS_DIR, run_workers
from tests.workers import dino_worker

N = 4


def tiny_vit(dynamic: bool = True):
    return create_backbone("vit_tiny_patch4", img_size=16, depth=1, embed_dim=16, num_heads=2, dynamic_img_size=dynamic)


def tiny_dino(backbone=None, **overrides) -> DINO:
    torch.manual_seed(0)
    cfg = DINOConfig(**{"out_dim": 32, "hidden_dim": 32, "bottleneck_dim": 8, **overrides})
    return DINO(backbone or tiny_vit(), cfg)


def crops(seed: int, n: int = N, local: int = 2) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 3, s, s, generator=g) for s in [16, 16] + [8] * local]


# -- the loss ------------------------------------------------------------------------------------


def naive_dino_loss(student: torch.Tensor, teacher_probs: torch.Tensor, tau_s: float) -> torch.Tensor:
    """main_dino.py DINOLoss.forward as a loop: CE of every (teacher view, other student view) pair, averaged."""
    total, terms = 0.0, 0
    for g in range(teacher_probs.shape[0]):
        for v in range(student.shape[0]):
            if v == g:
                continue
            for i in range(student.shape[1]):  # per image, then the mean over images
                log_p = F.log_softmax(student[v, i] / tau_s, dim=-1)
                total = total + -(teacher_probs[g, i] * log_p).sum() / student.shape[1]
            terms += 1
    return total / terms


@pytest.mark.parametrize("views", [2, 5])
def test_loss_equals_a_naive_loop_over_view_pairs_without_same_view_pairs(views) -> None:
    g = torch.Generator().manual_seed(0)
    student = torch.randn(views, 3, 7, generator=g, dtype=torch.float64)
    teacher = torch.randn(2, 3, 7, generator=g, dtype=torch.float64).softmax(-1)
    assert_close(self_distillation(student, teacher, 0.1), naive_dino_loss(student, teacher, 0.1))
    every_pair = sum(-(teacher[g] * F.log_softmax(student[v] / 0.1, -1)).sum(-1).mean()
                     for g in range(2) for v in range(views)) / (2 * views)
    assert not torch.isclose(self_distillation(student, teacher, 0.1), every_pair)  # the exclusion matters
    with pytest.raises(ValueError, match="agree in N and K"):
        self_distillation(student, teacher[:, :2], 0.1)


def test_method_loss_is_the_centred_sharpened_teacher_against_every_other_crop() -> None:
    model = tiny_dino()
    model.on_fit_start(0, 10, 5)
    model.center.copy_(torch.randn(1, 32))
    views = crops(1)
    center = model.center.clone()
    loss = model((views, None)).loss
    with torch.no_grad():
        student = torch.stack([model.head(model.backbone(x), freeze_last_layer=True) for x in views])  # [V, N, K]
        teacher = torch.stack([model.teacher_head(model.teacher_backbone(x)) for x in views[:2]])  # [2, N, K]
    probs = ((teacher - center) / 0.04).softmax(-1)  # step 0: the warm-up's start
    assert_close(loss, naive_dino_loss(student, probs, 0.1))
    # and the centre moved by the EMA of the teacher's batch mean
    assert_close(model.center, 0.9 * center + 0.1 * teacher.mean(dim=(0, 1)))


# -- teacher, head, schedules --------------------------------------------------------------------


def test_teacher_gets_no_gradient_and_follows_the_student_by_ema() -> None:
    model = tiny_dino(freeze_last_layer=0.0)
    model.on_fit_start(0, 10, 5)
    teacher = [*model.teacher_backbone.parameters(), *model.teacher_head.parameters()]
    student = [*model.backbone.parameters(), *model.head.parameters()]
    model((crops(0), None)).loss.backward()
    assert all(not p.requires_grad and p.grad is None for p in teacher)
    assert all(p.grad is not None for p in student if p.requires_grad)
    assert model.head.weight_g.grad is None and not model.head.weight_g.requires_grad  # norm_last_layer: g = 1
    with torch.no_grad():
        for p in student:
            p.add_(torch.randn_like(p))
    before = [p.clone() for p in teacher]
    model.after_step(0.3)
    m = cosine_momentum(0.3, 0.996)
    for t, t0, s in zip(teacher, before, student):
        assert_close(t, m * t0 + (1 - m) * s)
    assert model.step == 3  # 0.3 of 10 steps


@pytest.mark.parametrize("method", ["dino", "ibot"])
def test_the_teacher_drops_no_paths_while_the_student_does(method) -> None:
    torch.manual_seed(0)  # main_dino.py L162-166, main_ibot.py L206-215: drop_path_rate for the student only
    vit = create_backbone("vit_tiny_patch4", img_size=16, depth=2, embed_dim=16, num_heads=2, dynamic_img_size=True,
                          drop_path_rate=0.5)
    small = {"out_dim": 32, "hidden_dim": 32, "bottleneck_dim": 8}
    model = DINO(vit, DINOConfig(**small)) if method == "dino" else IBOT(vit, IBOTConfig(**small, patch_out_dim=32))
    model.train()
    x = torch.randn(N, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(model.teacher_backbone(x), model.teacher_backbone(x))
        assert not torch.equal(model.backbone(x), model.backbone(x))
        assert_close(model.teacher_backbone(x), model.backbone.eval()(x))  # same weights at step 0


def test_head_is_the_papers_mlp_bottleneck_and_weight_normalised_prototypes() -> None:
    torch.manual_seed(0)
    head = DINOHead(16, 50, hidden_dim=24, bottleneck_dim=8, num_layers=3)
    linear = [m for m in head.mlp if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linear] == [(16, 24), (24, 24), (24, 8)]
    assert sum(isinstance(m, torch.nn.GELU) for m in head.mlp) == 2
    x = torch.randn(5, 16)
    z = F.normalize(head.mlp(x), dim=-1)
    prototypes = F.normalize(head.weight_v, dim=1)  # g = 1: unit prototypes
    assert_close(head(x), z @ prototypes.T)
    assert (head(x).abs() <= 1 + 1e-6).all()  # cosines
    head(x, freeze_last_layer=True).sum().backward()
    assert torch.equal(head.weight_v.grad, torch.zeros_like(head.weight_v)) and head.mlp[0].weight.grad.abs().sum() > 0


def test_last_layer_is_frozen_for_the_first_epochs_and_the_teacher_temperature_warms_up() -> None:
    model = tiny_dino(freeze_last_layer=1.0, warmup_teacher_temperature_epochs=2.0)
    model.on_fit_start(0, 100, 10)  # 10 steps per epoch
    temps = []
    for step in (0, 5, 9, 10, 15, 20, 50):
        model.step = step
        model.head.zero_grad()
        model((crops(step), None)).loss.backward()
        frozen = not model.head.weight_v.grad.abs().sum() > 0
        assert frozen == (step < 10), step
        temps.append(model.teacher_temperature())
    assert temps == pytest.approx([0.04 + 0.03 * e / 2 for e in (0, 0.5, 0.9, 1.0, 1.5)] + [0.07, 0.07])


def test_weight_decay_follows_a_cosine_and_spares_biases_and_norms() -> None:
    cfg = from_dict({"method": {"name": "dino"}, "backbone": {"name": "vit_tiny_patch4"}}).optim
    assert (cfg.name, cfg.lr, cfg.weight_decay, cfg.weight_decay_end, cfg.min_lr, cfg.warmup_epochs) == (
        "adamw", 5e-4, 0.04, 0.4, 1e-6, 10.0)
    optimizer = build_optimizer(tiny_dino(), cfg, 1e-3)
    decayed = [g for g in optimizer.param_groups if g["weight_decay"] > 0]
    assert decayed and any(g["weight_decay"] == 0 for g in optimizer.param_groups)
    for step in (0, 25, 50, 100):
        set_weight_decay(optimizer, cfg, step, 100)
        expected = 0.4 + 0.5 * (0.04 - 0.4) * (1 + math.cos(math.pi * step / 100))  # dino utils.cosine_scheduler
        assert weight_decay_at(cfg, step, 100) == pytest.approx(expected)
        assert all(g["weight_decay"] == pytest.approx(expected) for g in decayed)
        assert all(g["weight_decay"] == 0 for g in optimizer.param_groups if g not in decayed)
    resnet = from_dict({"method": {"name": "dino"}, "backbone": {"name": "resnet18_small"}}).optim
    assert (resnet.name, resnet.lr, resnet.weight_decay, resnet.weight_decay_end) == ("sgd", 0.03, 1e-4, 1e-4)


# -- backbones, sizes, config --------------------------------------------------------------------


def test_resnets_take_every_crop_size_and_vits_need_dynamic_img_size() -> None:
    resnet = tiny_dino(create_backbone(TINY_RESNET["name"], **TINY_RESNET["kwargs"]))
    assert torch.isfinite(resnet((crops(0), None)).loss)
    with pytest.raises(ConfigError, match="dynamic_img_size: true"):
        tiny_dino(tiny_vit(dynamic=False))((crops(0), None))
    assert torch.isfinite(tiny_dino(tiny_vit(dynamic=False))((crops(0, local=0), None)).loss)  # 2 globals only
    with pytest.raises(ConfigError, match="local_crop_size.*multiple of 4"):
        tiny_dino()(([torch.zeros(2, 3, 16, 16)] * 2 + [torch.zeros(2, 3, 6, 6)], None))
    with pytest.raises(ConfigError, match="method.export must be student or teacher"):
        from_dict({"method": {"name": "dino", "export": "ema"}})


def test_backbone_passes_are_every_crop_with_backward_and_the_globals_through_the_teacher() -> None:
    views = crops(0)
    trained, frozen = tiny_dino().backbone_passes(views)
    assert [t is v for t, v in zip(trained, views)] == [True] * 4 and len(frozen) == 2 and frozen[1] is views[1]


@pytest.mark.parametrize("which", ["student", "teacher"])
def test_export_is_the_student_or_the_teacher_backbone_and_reloads(tmp_path, which) -> None:
    model = tiny_dino(export=which)
    with torch.no_grad():
        for p in model.backbone.parameters():
            p.add_(1.0)  # student != teacher
    assert model.encoder is (model.teacher_backbone if which == "teacher" else model.backbone)
    save_encoder(model.encoder, tmp_path / "encoder", method="dino", data={"image_size": 16})
    loaded, meta = load_encoder(tmp_path / "encoder")
    x = torch.randn(3, 3, 16, 16)
    model.encoder.eval(), loaded.eval()
    with torch.no_grad():
        assert meta["method"] == "dino" and torch.equal(model.encoder(x), loaded(x))


@pytest.mark.parametrize("method", ["dino", "ibot"])
@pytest.mark.parametrize("which", ["student", "teacher"])
def test_a_checkpoint_directory_loads_as_the_exported_encoder(tmp_path, method, which) -> None:
    """tools/knn.py --encoder runs/<run>/checkpoints/step_N: the checkpoint holds the whole method, and the
    encoder is the backbone `method.export` names (no `encoder.` keys, as DINO's encoder is a property)."""
    from safetensors.torch import save_file

    from selfsup.config import load_config
    from selfsup.methods import build_method

    head = {"out_dim": 32, "hidden_dim": 32, "bottleneck_dim": 8, **({"patch_out_dim": 32} if method == "ibot" else {})}
    raw = tiny_config_dict(tmp_path, method={"name": method, "export": which, **head}, data=E2E_DATA)
    raw["backbone"] = E2E_BACKBONE
    config = write_config(tmp_path, raw)
    cfg = load_config(config)
    torch.manual_seed(0)
    model = build_method(cfg.method, create_backbone(cfg.backbone.name, **cfg.backbone.kwargs))
    with torch.no_grad():
        for p in model.backbone.parameters():
            p.add_(1.0)  # student != teacher
    ckpt = tmp_path / "runs" / "tiny" / "checkpoints" / "step_00000001"
    ckpt.mkdir(parents=True)
    (ckpt.parent.parent / "config.yaml").write_text(config.read_text())
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt / "model.safetensors"))
    (ckpt / "trainer_state.json").write_text("{}")  # what marks a training checkpoint
    loaded, meta = load_encoder(ckpt)
    x = torch.randn(3, 3, 16, 16)
    model.eval(), loaded.eval()
    with torch.no_grad():
        assert meta["method"] == method and torch.equal(model.encoder(x), loaded(x))
        other = model.backbone if which == "teacher" else model.teacher_backbone
        assert not torch.equal(other(x), loaded(x))


# -- two processes --------------------------------------------------------------------------------


def assert_grads_close(grads: dict, expected: dict) -> None:
    for name, grad in expected.items():
        # timm resamples the position embedding for the local crops in float32 (resample_abs_pos_embed)
        tolerance = {"rtol": 1e-5, "atol": 1e-7} if name.endswith("pos_embed") else {"rtol": 1e-9, "atol": 1e-12}
        assert_close(grads[name], grad, **tolerance, msg=name)


def test_two_processes_share_the_centres_and_match_one_process_for_dino_and_ibot(tmp_path) -> None:
    run_workers(WORKERS_DIR / "dino_worker.py", str(tmp_path), nprocs=2, timeout=300)
    for r in range(2):
        record = json.loads((tmp_path / f"rank{r}.json").read_text())
        assert (record["rank"], record["world_size"], record["num_processes"]) == (r, 2, 2)
        assert record["checks"] == {"center_loss_and_grads": "ok", "ibot_centres_loss_and_grads": "ok"}, record["checks"]
    model = dino_worker.tiny_dino()  # 1 process x 2B, the same two steps
    with torch.no_grad():
        model((dino_worker.global_views(1, 2 * dino_worker.B), None))
    loss = model((dino_worker.global_views(2, 2 * dino_worker.B), None)).loss
    loss.backward()
    distributed = json.loads((tmp_path / "loss.json").read_text())
    assert distributed["world_size"] == 2 and distributed["mean_loss"] == pytest.approx(loss.item(), rel=1e-10)
    assert_close(load_file(str(tmp_path / "center.safetensors"))["center"], model.center, rtol=1e-12, atol=1e-14)
    grads = load_file(str(tmp_path / "grads.safetensors"))
    expected = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert set(grads) == set(expected) and "head.weight_v" in grads
    assert_grads_close(grads, expected)

    # iBOT, the same processes: [CLS] and patch centres, the masked-patch loss and every gradient
    masks = dino_worker.ibot_masks(3, 2 * dino_worker.B), dino_worker.ibot_masks(4, 2 * dino_worker.B)
    model = dino_worker.tiny_ibot(masks[0])
    with torch.no_grad():
        model((dino_worker.global_views(1, 2 * dino_worker.B), None))
    model.draw_masks = lambda n, grid: masks[1].flatten(0, 1)
    loss = model((dino_worker.global_views(2, 2 * dino_worker.B), None)).loss
    loss.backward()
    distributed = json.loads((tmp_path / "ibot_loss.json").read_text())
    assert distributed["world_size"] == 2 and distributed["mean_loss"] == pytest.approx(loss.item(), rel=1e-10)
    centres = load_file(str(tmp_path / "ibot_center.safetensors"))
    assert_close(centres["center"], model.center, rtol=1e-12, atol=1e-14)
    assert_close(centres["patch_center"], model.patch_center, rtol=1e-12, atol=1e-14)
    grads = load_file(str(tmp_path / "ibot_grads.safetensors"))
    expected = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert set(grads) == set(expected) and "mask_token" in grads and "head.patch_weight_v" in grads, sorted(grads)
    assert_grads_close(grads, expected)


# -- end to end -----------------------------------------------------------------------------------

E2E_METHOD = {"name": "tests.crashing_method:CrashingDINO", "out_dim": 64, "hidden_dim": 64, "bottleneck_dim": 16,
              "freeze_last_layer": 0.1, "warmup_teacher_temperature_epochs": 1.0}
E2E_BACKBONE = {"name": "vit_tiny_patch4", "kwargs": {"img_size": 16, "depth": 1, "embed_dim": 32, "num_heads": 2,
                                                      "dynamic_img_size": True}}
E2E_DATA = {"preset": "dino", "batch_size": 16, "views": {"local_crops": 2, "local_crop_size": 8}}
E2E_OPTIM = {"name": "adamw", "lr": 1e-3, "weight_decay": 0.04, "weight_decay_end": 0.4, "warmup_epochs": 0}


@pytest.mark.slow
def test_resumed_run_continues_bit_identically_with_centre_teacher_and_schedules(tmp_path) -> None:
    common = {"max_steps": 6, "checkpoint_every_steps": 3, "clip_grad": 3.0}

    def config(name: str):
        raw = tiny_config_dict(tmp_path, method=E2E_METHOD, train={**common, "run_name": name}, data=E2E_DATA)
        raw["backbone"], raw["optim"] = E2E_BACKBONE, E2E_OPTIM
        return write_config(tmp_path, raw, f"{name}.yaml")

    crashing_method.reset(None)
    pretrain.main(["--config", str(config("straight"))])
    killed = config("killed")
    crashing_method.reset(crash_at=5)  # dies in step 5, after the step-3 checkpoint
    with pytest.raises(crashing_method.SimulatedKill):
        pretrain.main(["--config", str(killed)])
    crashing_method.reset(None)
    pretrain.main(["--config", str(killed)])  # train.resume=auto

    runs = tmp_path / "runs"
    assert read_losses(runs / "killed") == read_losses(runs / "straight")

    def schedules(run: str) -> dict:  # step -> (tau_t, weight decay, lr); the resumed attempt's records win
        return {r["step"]: (r["teacher_temperature"], r["weight_decay"], r["lr"]) for r in read_metrics(runs / run) if "loss" in r}

    schedule = schedules("straight")
    assert schedules("killed") == schedule and len(schedule) == 6
    assert len({t for t, _, _ in schedule.values()}) > 1 and len({w for _, w, _ in schedule.values()}) > 1  # both move
    final = [load_file(str(list_checkpoints(runs / name / "checkpoints")[-1] / "model.safetensors"))
             for name in ("straight", "killed")]
    assert "center" in final[0] and final[0]["center"].abs().sum() > 0
    assert any(k.startswith("teacher_backbone.") for k in final[0]) and set(final[0]) == set(final[1])
    for name, value in final[0].items():
        assert torch.equal(value, final[1][name]), name


def test_benchmark_bare_step_runs_the_backbone_once_per_crop_size() -> None:
    """tools/benchmark.py's bare-backbone figure on multi-crop views: no torch.cat across sizes."""
    from selfsup.cli.benchmark import _bare_step
    from selfsup.engine import make_accelerator

    cfg = from_dict({"method": {"name": "dino"}, "backbone": E2E_BACKBONE})
    model, views = tiny_dino(), crops(0, local=3)
    calls = []
    step = _bare_step(cfg, model, (views, None), None, make_accelerator(cfg))
    backbone = next(c.cell_contents for c in step.__closure__ if isinstance(c.cell_contents, torch.nn.Module))
    backbone.register_forward_hook(lambda module, args, out: calls.append((tuple(args[0].shape), torch.is_grad_enabled())))
    step()
    assert step.views == 5 * N + 2 * N  # student: all 5 crops; teacher: the 2 globals
    assert calls == [((2 * N, 3, 16, 16), False), ((2 * N, 3, 16, 16), True), ((3 * N, 3, 8, 8), True)]
