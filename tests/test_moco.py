"""MoCo v2 / v3: momentum encoder, queue, losses against independent formulations, 2 processes, end to end."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch.testing import assert_close

import pretrain
from selfsup.backbones import create_backbone
from selfsup.builders import build_pretraining, run_dir_for
from selfsup.checkpoints import list_checkpoints
from selfsup.config import ConfigError, from_dict
from selfsup.engine import fit, make_accelerator, make_loader
from selfsup.export import load_encoder, save_encoder
from selfsup.losses import info_nce
from selfsup.batchnorm import SplitBatchNorm
from selfsup.methods.moco import MoCo, MoCoConfig, resolve_bn_mode
from selfsup.momentum import cosine_momentum
from selfsup.optim import build_optimizer
from tests import crashing_method
from tests.conftest import TINY_RESNET, read_losses, tiny_config_dict, write_config
from tests.multiproc import WORKERS_DIR, run_workers
from tests.workers import moco_worker

N = 8  # batch per step in the unit tests


def tiny_resnet():
    return create_backbone(TINY_RESNET["name"], **TINY_RESNET["kwargs"])


def tiny_moco(variant: str = "v2", backbone=None, **overrides) -> MoCo:
    torch.manual_seed(0)
    defaults = {"proj_hidden_dim": 32, "proj_out_dim": 16, "pred_hidden_dim": 32, "queue_size": 3 * N}
    return MoCo(backbone or tiny_resnet(), MoCoConfig(variant=variant, **{**defaults, **overrides}))


def views(seed: int, n: int = N, size: int = 16) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 3, size, size, generator=g) for _ in range(2)]


# -- momentum encoder ---------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["v2", "v3"])
def test_key_encoder_gets_no_gradients_and_follows_the_query_encoder(variant: str) -> None:
    model = tiny_moco(variant)
    key_params = [*model.momentum_encoder.parameters(), *model.momentum_projector.parameters()]
    query_params = [*model.encoder.parameters(), *model.projector.parameters()]
    model((views(0), None)).loss.backward()
    assert all(not p.requires_grad and p.grad is None for p in key_params)
    assert all(p.grad is not None for p in query_params)

    with torch.no_grad():  # a query encoder that has moved away from the key encoder
        for p in query_params:
            p.add_(torch.randn_like(p))
    before_k = [p.clone() for p in key_params]
    progress = 0.3
    model.after_step(progress)
    m = 0.999 if variant == "v2" else cosine_momentum(progress, 0.99)  # v2 constant, v3 cosine
    assert model.momentum_at(progress) == pytest.approx(m)
    for k, k0, q in zip(key_params, before_k, query_params):
        assert_close(k, m * k0 + (1 - m) * q)


# -- MoCo v2: the queue -------------------------------------------------------------------------


def test_queue_is_a_fifo_of_keys_that_wraps_around() -> None:
    model = tiny_moco("v2", queue_size=3 * N, bn_mode="none")  # no key shuffle: keys() is repeatable
    initial = model.queue.clone()
    assert model.queue.shape == (3 * N, 16) and int(model.queue_ptr) == 0
    assert_close(model.queue.norm(dim=1), torch.ones(3 * N))  # L2-normalised from the start
    rows = [initial[i] for i in range(3 * N)]  # the naive FIFO
    pointer = 0
    for step in range(5):  # 5 batches into room for 3: the pointer wraps after step 2
        x1, x2 = views(step)
        keys = model.keys(x2)  # train-mode BN: the same batch gives the same keys
        model(([x1, x2], None))
        for key in keys:
            rows[pointer] = key
            pointer = (pointer + 1) % (3 * N)
        assert int(model.queue_ptr) == pointer == ((step + 1) * N) % (3 * N)
        assert_close(model.queue, torch.stack(rows))
    assert_close(model.queue.norm(dim=1), torch.ones(3 * N))


def test_non_finite_keys_are_not_enqueued() -> None:
    model = tiny_moco("v2")
    model((views(0), None))
    queue, pointer = model.queue.clone(), int(model.queue_ptr)
    keys = torch.randn(N, 16)
    keys[3, 5] = float("nan")  # one diverged key: the whole step's keys stay out
    model._dequeue_and_enqueue(keys)
    assert torch.equal(model.queue, queue) and int(model.queue_ptr) == pointer == N
    model._dequeue_and_enqueue(torch.ones(N, 16))
    assert torch.equal(model.queue[N : 2 * N], torch.ones(N, 16)) and int(model.queue_ptr) == 2 * N


def test_v2_loss_uses_the_queue_before_this_batch_is_enqueued() -> None:
    model = tiny_moco("v2", bn_mode="none")  # no key shuffle: keys() is repeatable
    for step in range(2):
        model((views(step), None))  # fill part of the queue with real keys
    x1, x2 = views(9)
    queue_before = model.queue.clone()
    q, k = model.query(x1), model.keys(x2)
    loss = model(([x1, x2], None)).loss
    # independent form of MoCo Eq. 1: -log softmax over [q.k+, q.queue] / tau, positive first
    qn = F.normalize(q, dim=1)
    logits = torch.cat([(qn * k).sum(1, keepdim=True), qn @ queue_before.T], dim=1) / 0.2  # [N, 1 + K]
    assert_close(loss, -logits.log_softmax(dim=1)[:, 0].mean())
    assert not torch.equal(model.queue, queue_before)  # and only then enqueued


def test_symmetric_v2_averages_both_directions() -> None:
    model = tiny_moco("v2", symmetric=True, bn_mode="none")  # no key shuffle: keys() is repeatable
    x1, x2 = views(3)
    queue = model.queue.clone()
    expected = (info_nce(model.query(x1), model.keys(x2), queue, 0.2) + info_nce(model.query(x2), model.keys(x1), queue, 0.2)) / 2
    assert_close(model(([x1, x2], None)).loss, expected)


def test_queue_size_must_be_a_multiple_of_the_global_batch() -> None:
    model = tiny_moco("v2", queue_size=20)
    with pytest.raises(ConfigError, match=r"method\.queue_size=20.*data\.batch_size 8"):
        model((views(0), None))


# -- MoCo v3 ------------------------------------------------------------------------------------


def test_v3_loss_is_symmetric_and_matches_the_paper_formula() -> None:
    model = tiny_moco("v3")
    assert model.views == "moco_v3" and model.predictor is not None and not hasattr(model, "queue")
    x1, x2 = views(4)
    loss = model(([x1, x2], None)).loss
    assert_close(model(([x2, x1], None)).loss, loss)  # swapping the views changes nothing

    # MoCo v3 Alg. 1 by hand: ctr(q, k) = CE(q.k^T / tau, diagonal) * 2 tau, summed both ways
    def ctr(q, k, tau=model.cfg.temperature):
        logits = F.normalize(q, dim=1) @ F.normalize(k, dim=1).T / tau  # [N, N]
        return -logits.log_softmax(dim=1).diagonal().mean() * 2 * tau

    q1, q2, k1, k2 = model.query(x1), model.query(x2), model.keys(x1), model.keys(x2)
    assert_close(loss, ctr(q1, k2) + ctr(q2, k1))


def test_random_patch_projection_defaults_and_errors() -> None:
    vit = moco_worker.tiny_vit()
    model = tiny_moco("v3", backbone=vit)
    assert model.cfg.random_patch_projection and model.cfg.proj_layers == 3  # ViT defaults of the paper
    assert all(not p.requires_grad for p in vit.patch_embed.parameters())
    trainable = {id(p) for group in build_optimizer(model, from_dict({}).optim, 0.1).param_groups for p in group["params"]}
    assert not trainable & {id(p) for p in vit.patch_embed.parameters()}  # the optimizer leaves it out
    assert {id(p) for p in vit.blocks.parameters()} <= trainable

    resnet_v3 = tiny_moco("v3")
    assert not resnet_v3.cfg.random_patch_projection and resnet_v3.cfg.proj_layers == 2
    v2_vit = tiny_moco("v2", backbone=moco_worker.tiny_vit())
    assert not v2_vit.cfg.random_patch_projection and v2_vit.views == "moco_v2"
    with pytest.raises(ConfigError, match="random_patch_projection needs a ViT"):
        tiny_moco("v3", random_patch_projection=True)


def test_variant_defaults_follow_the_official_code() -> None:
    """v2: facebookresearch/moco (m 0.999, tau 0.2, 2048 -> 128, no BN); v3: facebookresearch/moco-v3 (m0 0.99,
    4096 -> 256 with BN, the ViT predictor ending in a BN without affine, tau 0.2 for ViTs and 1.0 for ResNets)."""
    v2, v3_resnet = tiny_moco("v2", proj_hidden_dim=None, proj_out_dim=None), tiny_moco("v3", proj_hidden_dim=None, proj_out_dim=None)
    v3_vit = tiny_moco("v3", backbone=moco_worker.tiny_vit(), proj_hidden_dim=None, proj_out_dim=None)
    got = {name: (m.cfg.momentum, m.cfg.temperature, m.cfg.proj_hidden_dim, m.cfg.proj_out_dim)
           for name, m in (("v2", v2), ("v3_resnet", v3_resnet), ("v3_vit", v3_vit))}
    assert got == {"v2": (0.999, 0.2, 2048, 128), "v3_resnet": (0.99, 1.0, 4096, 256), "v3_vit": (0.99, 0.2, 4096, 256)}
    assert isinstance(v2.projector[-1], torch.nn.Linear) and v2.projector[-1].bias is not None  # v2: Linear-ReLU-Linear
    for model in (v3_resnet, v3_vit):
        last = model.projector[-1]
        assert isinstance(last, torch.nn.BatchNorm1d) and not last.affine and last.num_features == 256
    vit_out = v3_vit.predictor[-1]  # builder.py MoCo_ViT: _build_mlp(2, dim, mlp_dim, dim) keeps last_bn
    assert isinstance(vit_out, torch.nn.BatchNorm1d) and not vit_out.affine and v3_vit.predictor[-2].bias is None
    assert isinstance(v3_resnet.predictor[-1], torch.nn.Linear)  # MoCo_ResNet: last_bn=False
    # values the config sets win over the variant's
    assert tiny_moco("v2", momentum=0.99, temperature=0.1).cfg.momentum == 0.99
    assert tiny_moco("v3", backbone=moco_worker.tiny_vit(), pred_last_batch_norm=False).predictor[-1].bias is not None


def test_optim_recipes_follow_the_official_code() -> None:
    v2 = from_dict({"method": {"name": "moco"}, "backbone": {"name": "resnet18_small"}}).optim
    assert (v2.name, v2.lr, v2.weight_decay, v2.warmup_epochs) == ("sgd", 0.03, 1e-4, 0.0)  # cosine, no warmup
    vit = from_dict({"method": {"name": "moco", "variant": "v3"}, "backbone": {"name": "vit_tiny_patch4"}}).optim
    assert (vit.name, vit.lr, vit.weight_decay, vit.warmup_epochs) == ("adamw", 1.5e-4, 0.1, 40.0)  # CONFIG.md
    resnet = from_dict({"method": {"name": "moco", "variant": "v3"}, "backbone": {"name": "resnet18_small"}}).optim
    assert (resnet.name, resnet.lr, resnet.weight_decay, resnet.warmup_epochs) == ("lars", 0.6, 1e-6, 10.0)


def test_config_is_validated() -> None:
    with pytest.raises(ConfigError, match="variant must be v2 or v3"):
        from_dict({"method": {"name": "moco", "variant": "v4"}})
    with pytest.raises(ConfigError, match="symmetric by definition"):
        from_dict({"method": {"name": "moco", "variant": "v3", "symmetric": False}})
    with pytest.raises(ConfigError, match="momentum_schedule"):
        from_dict({"method": {"name": "moco", "momentum_schedule": "linear"}})
    cfg = from_dict({"method": {"name": "moco", "variant": "v3"}})
    assert isinstance(cfg.method, MoCoConfig)


@pytest.mark.parametrize("variant, settings, world_size, expected", [
    ("v2", {}, 1, "split"),  # the one-process substitute for shuffle-BN (the official CIFAR demo)
    ("v2", {}, 2, "shuffle"),
    ("v3", {}, 1, "none"),  # whole-batch BN on one process = MoCo v3's SyncBN
    ("v3", {}, 4, "shuffle"),
    ("v2", {"sync_bn": True}, 2, "sync"),  # the older switches keep their meaning
    ("v2", {"shuffle_bn": False}, 1, "none"),
    ("v2", {"bn_mode": "shuffle"}, 1, "shuffle"),
    ("v3", {"bn_mode": "split"}, 2, "split"),
])
def test_bn_mode_auto_is_shuffle_bn_on_several_processes_and_split_bn_on_one(variant, settings, world_size, expected) -> None:
    assert resolve_bn_mode(MoCoConfig(variant=variant, **settings), world_size) == expected


def test_bn_mode_is_validated_and_the_older_switches_may_not_contradict_it() -> None:
    with pytest.raises(ConfigError, match="bn_mode must be one of auto, shuffle, split, sync, none"):
        from_dict({"method": {"name": "moco", "bn_mode": "ghost"}})
    with pytest.raises(ConfigError, match="sync_bn=true.*contradicts method.bn_mode=split; drop method.sync_bn"):
        from_dict({"method": {"name": "moco", "bn_mode": "split", "sync_bn": True}})
    with pytest.raises(ConfigError, match="shuffle_bn=false.*contradicts method.bn_mode=shuffle"):
        from_dict({"method": {"name": "moco", "bn_mode": "shuffle", "shuffle_bn": False}})
    with pytest.raises(ConfigError, match="bn_splits must be >= 1"):
        from_dict({"method": {"name": "moco", "bn_splits": 0}})
    model = tiny_moco("v2", bn_splits=3)  # N = 8 images do not split in 3
    with pytest.raises(ConfigError, match=r"bn_splits=3, got data\.batch_size 8; set data\.batch_size to a multiple of 3"):
        model((views(0), None))


def test_split_bn_normalises_each_key_in_a_random_chunk_and_returns_keys_in_order(capsys) -> None:
    """On one process, v2 by default: every BN of both encoders is split BN (the demo's SplitBatchNorm), and the key
    batch is shuffled before the key encoder, so key i is normalised with a random chunk, not with query i's."""
    model = tiny_moco("v2", bn_splits=2).double()
    assert model.cfg.bn_mode == "split" and "bn_mode=split" in capsys.readouterr().out  # says which one runs
    for part in (model.encoder, model.momentum_encoder):
        norms = [m for m in part.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        assert norms and all(isinstance(m, SplitBatchNorm) and m.num_splits == 2 for m in norms)
    # an independent key encoder with plain BN and the same weights (the state dict keys are plain BN's)
    plain_encoder, plain_projector = tiny_resnet().double(), copy.deepcopy(model.momentum_projector)
    plain_encoder.load_state_dict(model.momentum_encoder.state_dict())  # strict
    x = views(5)[1].double()  # [8, 3, 16, 16]
    torch.manual_seed(11)
    keys = model.keys(x)
    torch.manual_seed(11)
    permutation = torch.randperm(N)  # the draw keys() made
    assert not torch.equal(permutation, torch.arange(N))
    chunks = x[permutation].chunk(2)  # each chunk normalised alone, with plain BN in train mode
    shuffled = torch.cat([F.normalize(plain_projector(plain_encoder(c)), dim=1) for c in chunks])  # [N, D]
    expected = shuffled[torch.argsort(permutation)]  # back in input order
    assert_close(keys, expected, rtol=1e-10, atol=1e-12)
    # the query encoder splits its own (unshuffled) batch: query i sits in chunk i // (N / 2)
    plain_encoder.load_state_dict(model.encoder.state_dict())
    queries = model.query(x)
    assert_close(queries, torch.cat([model.projector(plain_encoder(c)) for c in x.chunk(2)]), rtol=1e-10, atol=1e-12)


def test_sync_bn_option_converts_every_batch_norm_and_runs_on_one_process() -> None:
    model = tiny_moco("v3", sync_bn=True)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert norms and all(isinstance(m, torch.nn.SyncBatchNorm) for m in norms)
    assert torch.isfinite(model((views(0), None)).loss)  # plain BN without a process group


# -- two processes --------------------------------------------------------------------------------


def test_two_processes_share_the_queue_and_match_one_process(tmp_path) -> None:
    """Shuffle-BN helpers, a queue identical on both ranks, and v3's loss/gradients of 2 x B = 1 x 2B."""
    run_workers(WORKERS_DIR / "moco_worker.py", str(tmp_path), nprocs=2, timeout=300)
    for r in range(2):
        record = json.loads((tmp_path / f"rank{r}.json").read_text())
        assert (record["rank"], record["world_size"], record["num_processes"]) == (r, 2, 2)
        assert set(record["checks"]) == {"shuffle", "v2_queue", "v3_loss_and_grads"}
        failed = {k: v for k, v in record["checks"].items() if v != "ok"}
        assert not failed, f"rank {r}: " + "\n".join(f"{k}:\n{v}" for k, v in failed.items())

    # the single-process reference: the same model (eval mode, see the worker) on the full batch
    model = moco_worker.tiny_moco("v3").double().eval()
    x1, x2 = moco_worker.global_views(7, 2 * moco_worker.B, torch.float64)
    loss = model(([x1, x2], None)).loss
    loss.backward()
    distributed = json.loads((tmp_path / "v3_loss.json").read_text())
    assert distributed["world_size"] == 2
    assert distributed["mean_loss"] == pytest.approx(loss.item(), rel=1e-10)
    grads = load_file(str(tmp_path / "v3_grads.safetensors"))
    expected = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert set(grads) == set(expected) and any(n.startswith("predictor.") for n in grads)
    for name, grad in expected.items():
        assert_close(grads[name], grad, rtol=1e-9, atol=1e-12, msg=name)


# -- end to end -----------------------------------------------------------------------------------

STEPS = 24
E2E = {
    # K = one batch: the queue wraps every step. On 256 toy images a longer queue learns too slowly to see in a test.
    # m = 0.99: the paper's 0.999 moves the key encoder too little in 24 steps to see the loss fall.
    # bn_splits 2 (split BN, the one-process default, in 2 chunks of 16): 8 chunks of 4 images learn too slowly to see
    "v2": {"method": {"name": "moco", "variant": "v2", "proj_hidden_dim": 64, "proj_out_dim": 32, "queue_size": 32,
                      "momentum": 0.99, "bn_splits": 2}},
    "v3": {"method": {"name": "moco", "variant": "v3", "proj_hidden_dim": 64, "proj_out_dim": 32,
                      "pred_hidden_dim": 64, "momentum": 0.9},
           "backbone": {"name": "vit_tiny_patch4", "kwargs": {"img_size": 16, "depth": 2, "embed_dim": 32, "num_heads": 2}},
           "optim": {"name": "adamw", "lr": 2e-3, "weight_decay": 0.05, "warmup_epochs": 0}},
}


@pytest.mark.parametrize("variant", ["v2", "v3"])
def test_moco_trains_exports_and_reloads_bit_identically(tmp_path, variant: str) -> None:
    spec = E2E[variant]
    raw = tiny_config_dict(tmp_path, method=spec["method"], train={"max_steps": STEPS})
    for section in ("backbone", "optim"):
        if section in spec:
            raw[section] = {**raw[section], **spec[section]} if section == "optim" else spec[section]
    cfg = from_dict(raw)
    run_dir = run_dir_for(cfg)
    run_dir.mkdir(parents=True)
    torch.manual_seed(0)
    method, train_set, _ = build_pretraining(cfg)
    assert train_set.transform.params[0]["crop_scale"] == ((0.2, 1.0) if variant == "v2" else (0.08, 1.0))
    patch_embed = {k: v.clone() for k, v in getattr(method.encoder, "patch_embed", torch.nn.Identity()).state_dict().items()}
    blocks_before = [p.clone() for p in method.encoder.parameters() if p.requires_grad]

    result = fit(method, make_loader(train_set, cfg.data, seed=0), cfg, make_accelerator(cfg, run_dir), run_dir=run_dir)
    assert result.steps == STEPS
    losses = list(read_losses(run_dir).values())
    assert len(losses) == STEPS and all(math.isfinite(v) for v in losses)
    # v2's first step compares against the random initial queue (easy negatives); judge after it is full
    start = 1 if variant == "v2" else 0
    assert sum(losses[-4:]) / 4 < sum(losses[start : start + 4]) / 4 - 0.05, losses
    assert any(not torch.equal(a, b) for a, b in zip(blocks_before, (p for p in method.encoder.parameters() if p.requires_grad)))
    if variant == "v3":  # random patch projection: the patch embedding never moved
        assert patch_embed and all(torch.equal(v, method.encoder.patch_embed.state_dict()[k]) for k, v in patch_embed.items())

    save_encoder(method.encoder, tmp_path / "encoder", method="moco", data={"image_size": 16})
    loaded, meta = load_encoder(tmp_path / "encoder")
    assert meta["method"] == "moco"
    x = torch.randn(5, 3, 16, 16)
    method.encoder.eval(), loaded.eval()
    with torch.no_grad():
        assert torch.equal(method.encoder(x), loaded(x))


def test_resumed_run_ends_with_the_same_queue_and_momentum_encoder(tmp_path) -> None:
    method = {"name": "tests.crashing_method:CrashingMoCo", "proj_hidden_dim": 64, "proj_out_dim": 32, "queue_size": 128}
    common = {"max_steps": 6, "checkpoint_every_steps": 3}

    crashing_method.reset(None)
    straight = tiny_config_dict(tmp_path, method=method, train={**common, "run_name": "straight"})
    pretrain.main(["--config", str(write_config(tmp_path, straight, "straight.yaml"))])

    killed = tiny_config_dict(tmp_path, method=method, train={**common, "run_name": "killed"})
    config_file = write_config(tmp_path, killed, "killed.yaml")
    crashing_method.reset(crash_at=5)  # dies in step 5, after the step-3 checkpoint
    with pytest.raises(crashing_method.SimulatedKill):
        pretrain.main(["--config", str(config_file)])
    crashing_method.reset(None)
    pretrain.main(["--config", str(config_file)])  # train.resume=auto

    runs = tmp_path / "runs"
    assert read_losses(runs / "killed") == read_losses(runs / "straight")
    final = [load_file(str(list_checkpoints(runs / name / "checkpoints")[-1] / "model.safetensors"))
             for name in ("straight", "killed")]
    assert int(final[0]["queue_ptr"]) == (6 * 32) % 128 == 64  # wrapped once, mid-queue
    assert any(k.startswith("momentum_encoder.") for k in final[0]) and set(final[0]) == set(final[1])
    for name, value in final[0].items():
        assert torch.equal(value, final[1][name]), name


@pytest.mark.parametrize("variant, symmetric", [("v2", False), ("v2", True), ("v3", None)])
def test_backbone_passes_name_the_views_each_encoder_sees(variant: str, symmetric) -> None:
    """What tools/benchmark.py times as the bare backbone: queries with backward, keys forward only."""
    extra = {} if symmetric is None else {"symmetric": symmetric}
    model = MoCo(create_backbone("resnet18_small"), MoCoConfig(variant=variant, **extra))
    x1, x2 = torch.zeros(1), torch.ones(1)
    trained, frozen = model.backbone_passes([x1, x2])
    both = variant == "v3" or symmetric
    assert [t is x1 for t in trained] == ([True, False] if both else [True])
    assert [t is x2 for t in frozen] == ([False, True] if both else [True])


def test_v3_vit_is_initialised_as_the_official_vision_transformer_moco() -> None:
    """moco-v3 vits.py L26-69: fixed sin-cos positions, q / k / v xavier bounds of their own [D, D] shape, other
    Linears xavier with zero bias, the patch projection xavier as a Linear C*p*p -> D and frozen, cls N(0, 1e-6)."""
    vit = create_backbone("vit_tiny_patch4", img_size=16, depth=2, embed_dim=32, num_heads=2)  # 4 x 4 patches of 4 px
    model = tiny_moco("v3", backbone=vit)
    assert model.cfg.vit_init == "moco_v3"
    dim, grid = 32, 4
    expected = torch.zeros(1 + grid * grid, dim)  # the class token's row stays 0
    for r in range(grid):
        for c in range(grid):
            for k in range(dim // 4):
                w = 10000.0 ** (-k / (dim // 4))
                row = 1 + r * grid + c  # row-major patch order, after the class token
                expected[row, k], expected[row, dim // 4 + k] = math.sin(r * w), math.cos(r * w)
                expected[row, dim // 2 + k], expected[row, 3 * dim // 4 + k] = math.sin(c * w), math.cos(c * w)
    assert_close(vit.pos_embed[0].detach(), expected)
    assert not vit.pos_embed.requires_grad  # fixed: not trained, and the optimizer leaves it out
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert id(vit.pos_embed) not in trainable and not trainable & {id(p) for p in vit.patch_embed.parameters()}

    for block in vit.blocks:
        qkv = block.attn.qkv.weight.detach()  # [3D, D]
        third_bound, whole_bound = math.sqrt(6 / (dim + dim)), math.sqrt(6 / (3 * dim + dim))
        for part in qkv.chunk(3):  # q, k, v
            assert part.abs().max() <= third_bound and part.abs().max() > whole_bound  # not one [3D, D] xavier
            assert abs(part.std().item() - third_bound / math.sqrt(3)) < 0.1 * third_bound / math.sqrt(3)
        for linear in (block.attn.proj, block.mlp.fc1, block.mlp.fc2):
            out_dim, in_dim = linear.weight.shape
            bound = math.sqrt(6 / (in_dim + out_dim))
            assert 0.9 * bound < linear.weight.abs().max() <= bound and not linear.bias.any()
        assert not block.attn.qkv.bias.any()
    proj = vit.patch_embed.proj
    bound = math.sqrt(6 / (3 * 4 * 4 + dim))  # vits.py L45: 3 * p * p + D
    assert 0.9 * bound < proj.weight.abs().max() <= bound and not proj.bias.any()
    assert 0 < vit.cls_token.abs().max() < 1e-5  # N(0, 1e-6)


def test_vit_init_defaults_and_errors() -> None:
    timm_init = tiny_moco("v3", backbone=moco_worker.tiny_vit(), vit_init="timm")
    assert timm_init.encoder.pos_embed.requires_grad  # timm's learned position embedding
    assert tiny_moco("v2", backbone=moco_worker.tiny_vit()).cfg.vit_init == "timm"
    assert tiny_moco("v3").cfg.vit_init == "timm"  # a ResNet
    with pytest.raises(ConfigError, match="method.vit_init=moco_v3 needs a ViT"):
        tiny_moco("v3", vit_init="moco_v3")
    with pytest.raises(ConfigError, match="method.vit_init"):
        MoCoConfig(vit_init="xavier")
