"""tools/linear_probe.py: the protocol follows the encoder's method (selfsup/probe_protocols.py), and each
protocol builds what its released code runs: MAE's BN without affine + adapting LARS, MoCo's plain SGD at
lr 30 on un-normalised features with x0.1 steps, SimCLR's Nesterov SGD with a zero-initialised head."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from selfsup.backbones import create_backbone
from selfsup.config import ConfigError, from_dict
from selfsup.export import save_encoder
from selfsup.finetune import LinearHead
from selfsup.optim import build_optimizer, build_scheduler, scaled_lr
from tests.conftest import TINY_RESNET
from tests.test_tools import load_tool


def encoder_of(tmp_path, method, **extra):
    directory = tmp_path / f"{method}_{extra.get('variant', '')}" / "encoder"
    backbone = create_backbone(TINY_RESNET["name"], **TINY_RESNET["kwargs"])
    meta = {"method": method} if method else {}
    save_encoder(backbone, directory, **meta, **extra, data={"dataset": "synthetic", "image_size": 16, "in_chans": 3})
    return str(directory)


def resolved(capsys, *argv):
    """The config the tool would run (--print-config) and the protocol line it printed."""
    cfg = from_dict(load_tool("linear_probe")([*argv, "--print-config"]))
    line = next(l for l in capsys.readouterr().err.splitlines() if "linear probe protocol" in l)
    return cfg, line


@pytest.mark.parametrize("method, extra, protocol", [
    ("moco", {"variant": "v2"}, "moco"),
    ("moco", {"variant": "v3"}, "moco_v3"),
    ("mae", {}, "mae"),
    ("simmim", {}, "mae"),
    ("simclr", {}, "simclr"),
    (None, {}, "moco_v3"),
])
def test_the_default_protocol_follows_the_encoders_method(tmp_path, capsys, method, extra, protocol):
    cfg, line = resolved(capsys, "--encoder", encoder_of(tmp_path, method, **extra))
    assert f"linear probe protocol {protocol} " in line and "source: " in line
    expected = {"moco": ("sgd", 30.0, "step", 100, False), "moco_v3": ("sgd", 0.1, "cosine", 90, False),
                "mae": ("lars", 0.1, "cosine", 90, True), "simclr": ("nesterov", 0.1, "cosine", 100, False)}[protocol]
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.schedule, cfg.train.epochs, cfg.probe.batch_norm) == expected


def test_protocol_flag_and_overrides_win_and_are_reported(tmp_path, capsys):
    encoder = encoder_of(tmp_path, "mae")
    cfg, line = resolved(capsys, "--encoder", encoder, "--protocol", "moco", "optim.lr=10")
    assert "protocol moco (--protocol" in line and "optim.lr=10.0 (protocol: 30.0)" in line
    assert (cfg.optim.name, cfg.optim.lr, cfg.probe.batch_norm) == ("sgd", 10.0, False)
    with pytest.raises(SystemExit):  # argparse's choices
        load_tool("linear_probe")(["--encoder", encoder, "--protocol", "byol", "--print-config"])
    with pytest.raises(ConfigError, match="probe.protocol"):
        from selfsup.probe_protocols import protocol_for
        protocol_for({}, "byol", vit=False)


def test_mae_protocol_head_is_bn_without_affine_then_linear_and_lars_adapts(tmp_path, capsys):
    cfg, _ = resolved(capsys, "--encoder", encoder_of(tmp_path, "mae"))
    assert (cfg.optim.weight_decay, cfg.optim.warmup_epochs, cfg.optim.lr_scaling) == (0.0, 10.0, "linear")
    torch.manual_seed(0)
    head = LinearHead(12, 5, batch_norm=cfg.probe.batch_norm, zero_init=cfg.probe.zero_init)
    assert isinstance(head.norm, nn.BatchNorm1d) and not head.norm.affine and head.norm.eps == 1e-6
    assert list(head.norm.parameters()) == []  # nothing to learn before the layer
    x = 3.0 + 2.0 * torch.randn(32, 12)
    standardised = (x - x.mean(0)) / torch.sqrt(x.var(0, unbiased=False) + 1e-6)
    torch.testing.assert_close(head(x), F.linear(standardised, head.fc.weight, head.fc.bias))  # BN, then linear

    lr = scaled_lr(cfg.optim, 256)
    optimizer = build_optimizer(head, cfg.optim, lr)
    w0 = head.fc.weight.detach().clone()
    F.cross_entropy(head(x), torch.arange(32) % 5).backward()
    g = head.fc.weight.grad.clone()
    optimizer.step()
    # MAE util/lars.py: weight decay 0, yet the weight (ndim 2) steps by the trust ratio 1e-3 ||w|| / ||g||
    adapted = lr * 1e-3 * w0.norm() / g.norm() * g
    torch.testing.assert_close(w0 - head.fc.weight.detach(), adapted)
    assert (lr * g).norm() > 100 * adapted.norm()  # plain SGD would move it by far more


def test_moco_protocol_is_plain_sgd_at_lr_30_on_unnormalised_features_with_steps(tmp_path, capsys):
    cfg, _ = resolved(capsys, "--encoder", encoder_of(tmp_path, "moco", variant="v2"))
    head = LinearHead(12, 5, batch_norm=cfg.probe.batch_norm, zero_init=cfg.probe.zero_init)
    x = 3.0 + 2.0 * torch.randn(8, 12)
    torch.testing.assert_close(head(x), x @ head.fc.weight.T + head.fc.bias)  # the features as they are
    assert abs(head.fc.weight.std().item() - 0.01) < 0.003 and not head.fc.bias.any()  # main_lincls.py L152
    lr = scaled_lr(cfg.optim, 256)
    optimizer = build_optimizer(head, cfg.optim, lr)
    assert type(optimizer) is torch.optim.SGD and lr == 30.0
    group = optimizer.param_groups[0]
    assert (group["nesterov"], group["momentum"], group["weight_decay"]) == (False, 0.9, 0.0)
    # x0.1 from the first update of epoch 60 and of epoch 80 (MoCo adjust_learning_rate), engine's calling convention
    steps_per_epoch = 3
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.train.epochs * steps_per_epoch, 0, steps_per_epoch)
    lrs = []
    for update in range(cfg.train.epochs * steps_per_epoch):
        scheduler.step_update(update + 1)  # engine: the lr of the next update
        lrs.append(optimizer.param_groups[0]["lr"])
    expected = [30.0 * 0.1 ** ((u // steps_per_epoch >= 60) + (u // steps_per_epoch >= 80)) for u in range(len(lrs))]
    assert lrs == pytest.approx(expected)


def test_simclr_protocol_is_nesterov_with_a_zero_initialised_head(tmp_path, capsys):
    cfg, _ = resolved(capsys, "--encoder", encoder_of(tmp_path, "simclr"))
    head = LinearHead(12, 5, batch_norm=cfg.probe.batch_norm, zero_init=cfg.probe.zero_init)
    assert not head.fc.weight.any() and isinstance(head.norm, nn.Identity)
    optimizer = build_optimizer(head, cfg.optim, 0.1)
    assert type(optimizer) is torch.optim.SGD and optimizer.param_groups[0]["nesterov"]


def test_step_schedule_needs_milestones():
    with pytest.raises(ConfigError, match="optim.lr_milestones"):
        from_dict({"optim": {"schedule": "step"}})
    with pytest.raises(ConfigError, match="optim.schedule"):
        from_dict({"optim": {"schedule": "linear"}})
