import math

import pytest
import torch

import pretrain
from selfsup.builders import build_pretraining, run_dir_for
from selfsup.checkpoints import list_checkpoints
from selfsup.config import from_dict
from selfsup.engine import fit, make_accelerator, make_loader
from selfsup.export import load_encoder, save_encoder
from selfsup.methods.simclr import SimCLR, SimCLRConfig, use_sync_bn
from tests import crashing_method
from tests.conftest import read_losses, tiny_config_dict, write_config


def test_simclr_trains_exports_and_reloads_bit_identically(tmp_path):
    cfg = from_dict(tiny_config_dict(tmp_path, train={"max_steps": 12}))
    run_dir = run_dir_for(cfg)
    run_dir.mkdir(parents=True)
    accelerator = make_accelerator(cfg, run_dir)
    torch.manual_seed(0)
    method, train_set, info = build_pretraining(cfg)
    result = fit(method, make_loader(train_set, cfg.data, seed=0), cfg, accelerator, run_dir=run_dir)
    assert result.steps == 12

    losses = list(read_losses(run_dir).values())
    assert len(losses) == 12 and all(math.isfinite(v) for v in losses)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.05, losses  # falling

    save_encoder(method.encoder, tmp_path / "encoder", method="simclr", data={"image_size": 16})
    loaded, meta = load_encoder(tmp_path / "encoder")
    assert meta["backbone"]["name"] == "resnet18_small" and meta["method"] == "simclr"
    x = torch.randn(5, 3, 16, 16)
    method.encoder.eval(), loaded.eval()
    with torch.no_grad():
        assert torch.equal(method.encoder(x), loaded(x))


def test_resume_after_kill_gives_the_same_loss_sequence(tmp_path):
    method = {"name": "tests.crashing_method:CrashingSimCLR", "proj_hidden_dim": 64, "proj_out_dim": 32}
    common = {"max_steps": 6, "checkpoint_every_steps": 3}

    crashing_method.reset(None)
    straight = tiny_config_dict(tmp_path, method=method, train={**common, "run_name": "straight"})
    pretrain.main(["--config", str(write_config(tmp_path, straight, "straight.yaml"))])
    expected = read_losses(tmp_path / "runs" / "straight")

    killed = tiny_config_dict(tmp_path, method=method, train={**common, "run_name": "killed"})
    config_file = write_config(tmp_path, killed, "killed.yaml")
    crashing_method.reset(crash_at=5)  # dies in step 5, after the step-3 checkpoint
    with pytest.raises(crashing_method.SimulatedKill):
        pretrain.main(["--config", str(config_file)])
    run_dir = tmp_path / "runs" / "killed"
    assert [p.name for p in list_checkpoints(run_dir / "checkpoints")] == ["step_00000003"]

    crashing_method.reset(None)
    pretrain.main(["--config", str(config_file)])  # same command: train.resume=auto
    resumed = read_losses(run_dir)
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6]
    for step in range(1, 7):
        assert resumed[step] == expected[step], (step, resumed[step], expected[step])


def test_tools_export_from_checkpoint_matches_final_encoder(tmp_path):
    from tools import export as export_tool

    cfg = tiny_config_dict(tmp_path, train={"max_steps": 2, "checkpoint_every_steps": 2})
    pretrain.main(["--config", str(write_config(tmp_path, cfg))])
    run_dir = tmp_path / "runs" / "tiny"
    out = export_tool.main(["--source", str(run_dir / "checkpoints" / "step_00000002"), "--out", str(tmp_path / "exp")])
    from_ckpt, _ = load_encoder(out)
    final, meta = load_encoder(run_dir / "encoder")
    assert meta["data"]["image_size"] == 16
    for key, value in final.state_dict().items():
        assert torch.equal(value, from_ckpt.state_dict()[key]), key


@pytest.mark.parametrize(
    "sync_bn, world_size, backend, expected",
    [(None, 1, None, False), (None, 2, "nccl", True), (None, 2, "gloo", False), (False, 2, "nccl", False),
     (True, 1, None, True)],
)
def test_sync_bn_defaults_to_global_bn_on_several_accelerator_processes(sync_bn, world_size, backend, expected):
    """SimCLR Sec. 2.2 global BN: unset, BN syncs when > 1 process trains on GPUs (SyncBN has no CPU kernel)."""
    assert use_sync_bn(sync_bn, world_size, backend) == expected


@pytest.mark.parametrize("sync_bn, expected", [(True, True), (False, False), (None, False)])
def test_sync_bn_converts_every_batch_norm_and_runs_on_one_process(sync_bn, expected):
    backbone = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                                   torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    backbone.embed_dim = 8
    model = SimCLR(backbone, SimCLRConfig(sync_bn=sync_bn, proj_hidden_dim=16, proj_out_dim=8))
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert len(norms) == 2 and all(isinstance(m, torch.nn.SyncBatchNorm) == expected for m in norms)
    views = [torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)]
    assert torch.isfinite(model((views, None)).loss)  # without a process group SyncBatchNorm is plain BN
