"""SWA and flooding: the SWA model against the arithmetic mean of the weights recorded at each epoch's end,
its BatchNorm statistics against the batch mean computed directly, SWA's learning rates against the paper's
formulas, and flooding's gradient against its closed form (the same gradient, sign flipped below the level)."""

import math

import pytest
import torch
from torch import nn

from selfsup.averaging import SWASchedule, swa_learning_rate
from selfsup.backbones import create_backbone
from selfsup.config import ConfigError, from_dict
from selfsup.engine import fit, make_accelerator, make_loader
from selfsup.evaluation import ClassifierEvaluator
from selfsup.finetune import Classifier, SupervisedTask, build_finetune_optimizer
from selfsup.losses import flood
from selfsup.methods.base import StepOutput
from selfsup.optim import build_scheduler
from tests.test_finetune import finetune_cfg, synthetic_images


def test_flooding_gradient_flips_sign_below_the_level():
    # L(w) = sum(w^2): dL/dw = 2w; flooded: sign(L - b) * 2w, and the value |L - b| + b
    for w0, level, sign in (([0.3, -0.4], 0.5, -1.0), ([1.0, 2.0], 0.5, 1.0)):  # L = 0.25 < b; L = 5 > b
        w = torch.tensor(w0, dtype=torch.float64, requires_grad=True)
        loss = (w ** 2).sum()
        flooded = flood(loss, level)
        flooded.backward()
        assert flooded.item() == pytest.approx(abs(loss.item() - level) + level)
        assert torch.allclose(w.grad, sign * 2 * w.detach())
    assert flood(loss, None) is loss  # off: the loss itself
    with pytest.raises(ConfigError, match="optim.flood_level"):
        from_dict({"optim": {"flood_level": 0}})


class _Quadratic(nn.Module):
    """A Method-like module whose loss is sum(w^2), whatever the batch."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor([0.3, -0.4]))

    def forward(self, batch):
        return StepOutput((self.w ** 2).sum())

    def after_step(self, progress):
        pass


class _Zeros(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, key):  # key: (epoch, index) from the engine's sampler
        return torch.zeros(1)


def test_the_engine_trains_on_the_flooded_loss(tmp_path):
    # loss 0.25 below the level 0.5: one plain SGD step ascends, w <- w + lr * 2w
    cfg = from_dict({"data": {"batch_size": 4, "num_workers": 0},
                     "optim": {"name": "sgd", "lr": 0.1, "min_lr": 0.1, "lr_scaling": "none", "momentum": 0.0, "weight_decay": 0.0,
                               "warmup_epochs": 0, "flood_level": 0.5},
                     "train": {"epochs": 1, "max_steps": 1, "output_dir": str(tmp_path), "checkpoint_every_steps": 100,
                               "precision": "no"},
                     "eval": {"at_end": False}})
    model = _Quadratic()
    start = model.w.detach().clone()
    fit(model, make_loader(_Zeros(), cfg.data, seed=0), cfg, make_accelerator(cfg, tmp_path), run_dir=tmp_path)
    assert torch.allclose(model.w.detach(), start + 0.1 * 2 * start)


def test_swa_is_the_mean_of_the_epoch_end_weights_and_its_batch_norm_is_recomputed(tmp_path):
    cfg = finetune_cfg(tmp_path, "full")
    cfg.train.max_steps, cfg.train.epochs, cfg.train.precision = None, 3, "no"  # 32 images / 16 = 2 steps per epoch
    torch.manual_seed(0)
    model = Classifier(create_backbone("resnet10_small", channels=[8, 8, 8, 8], stem_width=8), num_classes=4)
    task = SupervisedTask(model, 4, swa_start_epoch=1)
    snapshots = {}
    averaged = task.after_epoch

    def record(epoch):  # the live weights at each epoch's end, then the task's own update
        snapshots[epoch] = {k: v.detach().double().clone() for k, v in model.named_parameters()}
        averaged(epoch)

    task.after_epoch = record
    optimizer = build_finetune_optimizer(model, cfg, 0.01)
    train_set = synthetic_images(cfg, augment=True, n=32)
    loader = make_loader(train_set, cfg.data, seed=0)
    swa_schedule = lambda base, steps: SWASchedule(base, steps, start_epoch=1, swa_lr=0.004)  # noqa: E731
    fit(task, loader, cfg, make_accelerator(cfg, tmp_path / "ft"), run_dir=tmp_path / "ft", optimizer=optimizer,
        schedule=swa_schedule)

    assert sorted(snapshots) == [1, 2, 3] and int(task.swa.n_averaged) == 2  # epochs 2 and 3: after the start
    for name, value in task.swa.module.named_parameters():
        assert torch.allclose(value.double(), (snapshots[2][name] + snapshots[3][name]) / 2, atol=1e-6), name

    bn_batches = torch.utils.data.DataLoader(train_set, batch_size=16)
    stem = task.swa.module.backbone
    before = stem.bn1.running_mean.clone()
    record_ = ClassifierEvaluator(synthetic_images(cfg, augment=False, n=16), batch_size=8, bn_batches=bn_batches)(task)
    assert {"top1", "swa_top1", "swa_top5"} <= set(record_) and record_["swa_snapshots"] == 2
    with torch.no_grad():  # the stem's BN input over every training image (2 equal batches: the overall mean)
        images = torch.cat([views[0] for views, _ in bn_batches])
        expected = stem.conv1(images).mean(dim=(0, 2, 3))
    assert not torch.allclose(before, expected)
    assert torch.allclose(stem.bn1.running_mean, expected, atol=1e-5)


def test_swa_learning_rates_follow_the_paper():
    common = dict(start_update=8, steps_per_epoch=4, start_lr=0.2, peak_lr=1.0, swa_lr=0.1)
    # cyclic (Izmailov et al. Eq. 2): alpha1 -> alpha2 linearly within each epoch, alpha2 at its last update
    cyclic = [swa_learning_rate(u, anneal_steps=0, mode="cyclic", **common) for u in range(9, 17)]
    assert cyclic == pytest.approx([1 - 0.9 * t for t in (0.25, 0.5, 0.75, 1.0)] * 2)
    # constant: cosine from the schedule's rate to swa_lr over 4 updates (SWALR's "cos"), then flat
    constant = [swa_learning_rate(u, anneal_steps=4, mode="constant", **common) for u in range(9, 15)]
    alphas = [(1 - math.cos(math.pi * k / 4)) / 2 for k in (1, 2, 3, 4, 4, 4)]
    assert constant == pytest.approx([0.2 * (1 - a) + 0.1 * a for a in alphas])

    # through the engine's scheduler: the base schedule until the start, then SWA's rate times lr_scale
    params = [nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))]
    optimizer = torch.optim.SGD([{"params": params[:1], "lr_scale": 0.5}, {"params": params[1:]}], lr=1.0)
    base = build_scheduler(optimizer, from_dict({"optim": {"warmup_epochs": 0}}).optim, total_steps=16, warmup_steps=0)
    schedule = SWASchedule(base, 4, start_epoch=2, swa_lr=0.1, mode="cyclic")
    schedule.step_update(5)
    base_lr = 0.5 * (1 + math.cos(math.pi * 5 / 16))  # timm's cosine at update 5 (t_initial 16)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.5 * base_lr, base_lr])
    schedule.step_update(12)  # the last update of epoch 3: alpha2
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.05, 0.1])


def test_swa_config_errors():
    with pytest.raises(ConfigError, match="finetune.swa_schedule"):
        from_dict({"finetune": {"swa_start_epoch": 1, "swa_schedule": "cosine"}})
    with pytest.raises(ConfigError, match="finetune.swa_start_epoch"):
        from_dict({"finetune": {"swa_start_epoch": -1}})


@pytest.mark.slow
def test_swa_resumed_from_an_epochs_last_step_equals_the_straight_run(tmp_path):
    # a checkpoint taken at an epoch's last step precedes that epoch's snapshot: the resumed run takes it
    def run(name, resume="never"):
        cfg = finetune_cfg(tmp_path, "full")
        cfg.train.max_steps, cfg.train.epochs, cfg.train.precision = None, 3, "no"
        cfg.train.checkpoint_every_steps, cfg.train.keep_checkpoints, cfg.train.resume = 2, 0, resume
        torch.manual_seed(0)
        model = Classifier(create_backbone("resnet10_small", channels=[8, 8, 8, 8], stem_width=8), num_classes=4)
        task = SupervisedTask(model, 4, swa_start_epoch=1)
        fit(task, make_loader(synthetic_images(cfg, augment=True, n=32), cfg.data, seed=0), cfg,
            make_accelerator(cfg, tmp_path / name), run_dir=tmp_path / name,
            optimizer=build_finetune_optimizer(model, cfg, 0.01),
            schedule=lambda base, steps: SWASchedule(base, steps, start_epoch=1, swa_lr=0.004))
        return task

    straight = run("straight")
    resumed = run("resumed", resume=str(tmp_path / "straight" / "checkpoints" / "step_00000004"))
    assert int(straight.swa.n_averaged) == int(resumed.swa.n_averaged) == 2
    for (name, a), (_, b) in zip(straight.swa.state_dict().items(), resumed.swa.state_dict().items()):
        assert torch.equal(a, b), name
