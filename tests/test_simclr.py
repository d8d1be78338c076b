import copy
import math

import pytest
import torch
import torch.nn.functional as F

import pretrain
from selfsup.backbones import create_backbone
from selfsup.builders import build_pretraining, run_dir_for
from selfsup.checkpoints import list_checkpoints
from selfsup.config import OptimConfig, from_dict
from selfsup.engine import fit, make_accelerator, make_loader
from selfsup.export import load_encoder, save_encoder
from selfsup.batchnorm import GlobalBatchNorm
from selfsup.methods.simclr import SimCLR, SimCLRConfig, use_sync_bn
from selfsup.optim import build_optimizer
from tests import crashing_method
from tests.conftest import TINY_RESNET, read_losses, tiny_config_dict, write_config


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
    "sync_bn, world_size, expected",
    [(None, 1, False), (None, 2, True), (False, 2, False), (True, 1, True)],
)
def test_sync_bn_defaults_to_global_bn_on_several_processes(sync_bn, world_size, expected):
    """SimCLR Sec. 2.2 global BN: unset, BN is global whenever > 1 process trains (GPUs and CPU alike)."""
    assert use_sync_bn(sync_bn, world_size) == expected


@pytest.mark.parametrize("sync_bn, expected", [(True, True), (False, False), (None, False)])
def test_sync_bn_converts_every_batch_norm_and_runs_on_one_process(sync_bn, expected):
    backbone = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                                   torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    backbone.embed_dim = 8
    model = SimCLR(backbone, SimCLRConfig(sync_bn=sync_bn, proj_hidden_dim=16, proj_out_dim=8))
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    global_kinds = (torch.nn.SyncBatchNorm, GlobalBatchNorm)  # no process group here: the CPU kind
    assert len(norms) == 3 and all(isinstance(m, global_kinds) == expected for m in norms)  # f, g hidden, g output
    views = [torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)]
    assert torch.isfinite(model((views, None)).loss)  # without a process group SyncBatchNorm is plain BN


def test_one_simclr_step_equals_a_plain_pytorch_reference_step():
    """Loss, every gradient and the weights after SGD steps, against SimCLR written here in plain PyTorch.

    The reference, as SimCLR Alg. 1 and google-research/simclr tf2/model.py (`Model.__call__`: the views
    concatenated, `tf.concat(features_list, 0)  # (num_transforms * bsz, h, w, c)`, then one base-network
    pass): one backbone forward over both views, so BN statistics cover all 2N views (not one pass per view
    as in lightly's SimCLR example); the projector on top; NT-Xent as a 2N x 2N cosine-similarity matrix / tau
    with the diagonal masked and the positive of row i at i + N (i < N) or i - N; torch.optim.SGD with
    momentum 0.9, no Nesterov, weight decay on weights only (not on biases and norm parameters).
    """
    tau, lr, wd, n = 0.2, 0.1, 0.05, 8
    torch.manual_seed(0)
    model = SimCLR(create_backbone(TINY_RESNET["name"], **TINY_RESNET["kwargs"]),
                   SimCLRConfig(temperature=tau, proj_hidden_dim=32, proj_out_dim=16)).double()
    reference = torch.nn.ModuleDict({"encoder": copy.deepcopy(model.encoder), "projector": copy.deepcopy(model.projector)})
    assert any(isinstance(m, torch.nn.BatchNorm1d) for m in reference.modules())  # BN in the projector too
    g = torch.Generator().manual_seed(1)
    steps = [[torch.randn(n, 3, 16, 16, generator=g, dtype=torch.float64) for _ in range(2)] for _ in range(2)]

    def reference_loss(x1, x2, per_view=False):
        if per_view:  # lightly's example: BN statistics over each view's N images
            z = torch.cat([reference["projector"](reference["encoder"](x)) for x in (x1, x2)])
        else:
            z = reference["projector"](reference["encoder"](torch.cat([x1, x2])))  # [2N, D], BN over 2N
        z = F.normalize(z, dim=1)
        similarity = z @ z.T / tau  # [2N, 2N]
        similarity = similarity.masked_fill(torch.eye(2 * n, dtype=torch.bool), float("-inf"))
        positive = torch.cat([torch.arange(n) + n, torch.arange(n)])  # row i's other view
        return F.cross_entropy(similarity, positive)

    decay = [p for p in reference.parameters() if p.ndim > 1]
    no_decay = [p for p in reference.parameters() if p.ndim <= 1]
    reference_optimizer = torch.optim.SGD([{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}],
                                          lr=lr, momentum=0.9, nesterov=False)
    optimizer = build_optimizer(model, OptimConfig(name="sgd", lr=lr, weight_decay=wd, momentum=0.9), lr)
    names = {id(p): name for name, p in model.named_parameters()}
    ours_no_decay = {names[id(p)] for group in optimizer.param_groups if group["weight_decay"] == 0 for p in group["params"]}
    assert ours_no_decay == {name for name, p in reference.named_parameters() if p.ndim <= 1}

    for step, (x1, x2) in enumerate(steps):  # two steps: the second one uses the momentum buffers
        if step == 0:
            with torch.no_grad():  # the check can fail: BN over each view alone gives another loss
                per_view = reference_loss(x1, x2, per_view=True)
                reference.load_state_dict(model.state_dict())  # undo the running-stat update of that pass
        loss = model(([x1, x2], None)).loss
        expected = reference_loss(x1, x2)
        if step == 0:
            assert not torch.allclose(per_view, expected, rtol=1e-6)
        torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
        optimizer.zero_grad()
        reference_optimizer.zero_grad()
        loss.backward()
        expected.backward()
        reference_parameters = dict(reference.named_parameters())
        assert set(reference_parameters) == {name for name, _ in model.named_parameters()}
        for name, p in model.named_parameters():
            torch.testing.assert_close(p.grad, reference_parameters[name].grad, rtol=1e-10, atol=1e-12, msg=f"grad {name}")
        optimizer.step()
        reference_optimizer.step()
        expected_state = reference.state_dict()  # weights and BN running statistics
        for name, value in model.state_dict().items():
            torch.testing.assert_close(value, expected_state[name], rtol=1e-10, atol=1e-12, msg=f"step {step}: {name}")


@pytest.mark.parametrize("bn_per_view", [True, False])
def test_bn_per_view_normalises_each_view_with_its_own_statistics(bn_per_view):
    """bn_per_view: every BN sees each view's N images alone, as a per-view forward (lightly's example) does;
    unset, one pass sees all 2N (google-research/simclr). Checked on the batch statistics each BN computes, the
    running statistics it keeps and the loss, against a reference that runs f and g on each view in turn."""
    tau, n = 0.5, 6
    torch.manual_seed(0)
    backbone = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                                   torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())  # BN in f and in g
    backbone.embed_dim = 8
    model = SimCLR(backbone, SimCLRConfig(temperature=tau, proj_hidden_dim=32, proj_out_dim=16,
                                          bn_per_view=bn_per_view)).double()
    reference = torch.nn.ModuleDict({"encoder": copy.deepcopy(model.encoder), "projector": copy.deepcopy(model.projector)})
    g = torch.Generator().manual_seed(1)
    x1, x2 = (torch.randn(n, 3, 8, 8, generator=g, dtype=torch.float64) + shift for shift in (0.0, 1.0))

    def record(module):  # (BN name, batch mean, batch variance) of every BN call, in call order
        seen = []
        hooks = [m.register_forward_pre_hook(lambda m, args, name=name: seen.append(
            (name, args[0].mean([d for d in range(args[0].ndim) if d != 1]),
             args[0].var([d for d in range(args[0].ndim) if d != 1], unbiased=False))))
            for name, m in module.named_modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        return seen, hooks

    seen, hooks = record(model)
    loss = model(([x1, x2], None)).loss
    ref_seen, ref_hooks = record(reference)
    z = torch.cat([reference["projector"](reference["encoder"](x)) for x in (x1, x2)])  # [2N, D], one view at a time
    for h in hooks + ref_hooks:
        h.remove()
    z = F.normalize(z, dim=1)
    similarity = (z @ z.T / tau).masked_fill(torch.eye(2 * n, dtype=torch.bool), float("-inf"))  # [2N, 2N]
    expected = F.cross_entropy(similarity, torch.cat([torch.arange(n) + n, torch.arange(n)]))

    norms = sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert len(ref_seen) == 2 * norms
    if not bn_per_view:  # one pass: each BN once, over 2N samples, so the statistics differ from the reference's
        assert len(seen) == norms
        assert not torch.allclose(loss, expected)
        return
    assert [name for name, _, _ in seen] == [name for name, _, _ in ref_seen]
    for (name, mean, var), (_, ref_mean, ref_var) in zip(seen, ref_seen):
        torch.testing.assert_close(mean, ref_mean, rtol=1e-12, atol=1e-12, msg=f"batch mean at {name}")
        torch.testing.assert_close(var, ref_var, rtol=1e-12, atol=1e-12, msg=f"batch variance at {name}")
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    expected_state = reference.state_dict()  # running statistics after one update per view
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, expected_state[name], rtol=1e-12, atol=1e-12, msg=name)


def test_proj_last_batch_norm_is_the_official_and_lightly_projection_head():
    """proj_last_batch_norm: Linear - BN - ReLU - Linear (no bias) - BN (gamma, beta), as google-research/simclr
    (tf2/model.py L180-186) and lightly's SimCLRProjectionHead build it; built under the same seed it has the
    weights of that head written here in plain PyTorch and gives the same output, standardised per dimension."""
    backbone = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 10))
    backbone.embed_dim = 10
    torch.manual_seed(0)
    model = SimCLR(backbone, SimCLRConfig(proj_hidden_dim=16, proj_out_dim=8, proj_last_batch_norm=True)).double()
    torch.manual_seed(0)
    reference = torch.nn.Sequential(torch.nn.Linear(10, 16, bias=False), torch.nn.BatchNorm1d(16), torch.nn.ReLU(),
                                    torch.nn.Linear(16, 8, bias=False), torch.nn.BatchNorm1d(8)).double()
    assert [tuple(v.shape) for v in model.projector.state_dict().values()] == [
        tuple(v.shape) for v in reference.state_dict().values()]
    for value, expected in zip(model.projector.state_dict().values(), reference.state_dict().values()):
        assert torch.equal(value, expected)
    h = torch.randn(32, 10, dtype=torch.float64)
    z = model.projector(h)
    torch.testing.assert_close(z, reference(h), rtol=0, atol=0)
    torch.testing.assert_close(z.mean(0), torch.zeros(8, dtype=torch.float64), rtol=0, atol=1e-12)  # beta = 0
    torch.testing.assert_close(z.var(0, unbiased=False), torch.ones(8, dtype=torch.float64), rtol=0, atol=1e-3)  # gamma = 1
    torch.manual_seed(0)
    default = SimCLR(backbone, SimCLRConfig(proj_hidden_dim=16, proj_out_dim=8)).double()  # on by default
    assert [tuple(v.shape) for v in default.projector.state_dict().values()] == [
        tuple(v.shape) for v in reference.state_dict().values()]
    plain = SimCLR(backbone, SimCLRConfig(proj_hidden_dim=16, proj_out_dim=8, proj_last_batch_norm=False))
    assert not any(isinstance(m, torch.nn.BatchNorm1d) for m in list(plain.projector)[3:])  # the v1 paper's head
    assert plain.projector[3].bias is not None
