"""BYOL, Barlow Twins and VICReg: each loss against a naive loop, the 2-process equivalence, BYOL's target."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import Tensor
from torch.testing import assert_close

from selfsup.batchnorm import GlobalBatchNorm
from selfsup.builders import build_pretraining, run_dir_for
from selfsup.config import ConfigError, from_dict
from selfsup.engine import fit, make_accelerator, make_loader
from selfsup.export import load_encoder, save_encoder
from selfsup.losses import barlow_twins_loss, byol_loss, cross_correlation, vicreg_loss, vicreg_terms
from selfsup.methods.barlow_twins import BarlowTwins, BarlowTwinsConfig
from selfsup.methods.byol import BYOL, BYOLConfig
from selfsup.methods.vicreg import VICReg, VICRegConfig
from selfsup.momentum import cosine_momentum
from tests.conftest import read_losses, tiny_config_dict
from tests.multiproc import WORKERS_DIR, run_workers
from tests.workers.noncontrastive_worker import tiny_backbone


def rand(*shape: int, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * 1.5 + 0.3).requires_grad_(True)


def grads(loss: Tensor, *inputs: Tensor) -> tuple[Tensor, ...]:
    return torch.autograd.grad(loss, inputs)


# -- losses against naive loops ---------------------------------------------------------------------


def test_byol_loss_is_two_minus_two_cosine_per_sample() -> None:
    p, z = rand(5, 7, seed=0), rand(5, 7, seed=1)
    naive = sum(2 - 2 * (p[i] @ z[i]) / (p[i].norm() * z[i].norm()) for i in range(5)) / 5
    assert_close(byol_loss(p, z), naive)
    assert_close(grads(byol_loss(p, z), p, z), grads(naive, p, z))


def naive_barlow_twins(a: Tensor, b: Tensor, lambd: float) -> Tensor:
    """Eqs. 1-2 of the paper, one entry at a time: C_ij = sum_b a_bi b_bj / sqrt(sum_b a_bi^2) sqrt(sum_b b_bj^2)
    on embeddings centred along the batch (the Pearson correlation; the code's eps set to 0)."""
    n, d = a.shape
    a = torch.stack([a[:, i] - sum(a[k, i] for k in range(n)) / n for i in range(d)], dim=1)
    b = torch.stack([b[:, j] - sum(b[k, j] for k in range(n)) / n for j in range(d)], dim=1)
    loss = a.new_zeros(())
    for i in range(d):
        for j in range(d):
            num = sum(a[k, i] * b[k, j] for k in range(n))
            c = num / (torch.sqrt(sum(a[k, i] ** 2 for k in range(n))) * torch.sqrt(sum(b[k, j] ** 2 for k in range(n))))
            loss = loss + ((1 - c) ** 2 if i == j else lambd * c**2)
    return loss


@pytest.mark.parametrize("lambd", [5e-3, 0.7])
def test_barlow_twins_loss_matches_the_paper_entry_by_entry(lambd: float) -> None:
    z1, z2 = rand(6, 4, seed=2), rand(6, 4, seed=3)
    loss, naive = barlow_twins_loss(z1, z2, lambd, eps=0.0), naive_barlow_twins(z1, z2, lambd)
    assert_close(loss, naive)
    assert_close(grads(loss, z1, z2), grads(naive, z1, z2))
    c = cross_correlation(z1, z1, eps=0.0)  # a view with itself: ones on the diagonal, symmetric
    assert_close(torch.diagonal(c), torch.ones(4, dtype=torch.float64))
    assert_close(c, c.T)


def naive_vicreg(a: Tensor, b: Tensor, eps: float = 1e-4) -> tuple[Tensor, Tensor, Tensor]:
    """Eqs. 1-5 of the paper with explicit sums: s, v (averaged over the branches), c (summed over them)."""
    n, d = a.shape
    s = sum((a[k, i] - b[k, i]) ** 2 for k in range(n) for i in range(d)) / (n * d)
    v, c = a.new_zeros(()), a.new_zeros(())
    for z in (a, b):
        mean = [sum(z[k, i] for k in range(n)) / n for i in range(d)]
        cov = [[sum((z[k, i] - mean[i]) * (z[k, j] - mean[j]) for k in range(n)) / (n - 1) for j in range(d)]
               for i in range(d)]
        v = v + sum(torch.clamp(1 - torch.sqrt(cov[i][i] + eps), min=0) for i in range(d)) / d / 2
        c = c + sum(cov[i][j] ** 2 for i in range(d) for j in range(d) if i != j) / d
    return s, v, c


def test_vicreg_terms_match_the_paper_entry_by_entry() -> None:
    z1, z2 = rand(6, 4, seed=4) * 0.4, rand(6, 4, seed=5)  # view 1 under the std target, so the hinge is active
    terms, naive = vicreg_terms(z1, z2), naive_vicreg(z1, z2)
    assert float(naive[1].detach()) > 0  # the variance hinge is active on some dimensions
    for t, u in zip(terms, naive):
        assert_close(t, u)
    loss = vicreg_loss(z1, z2)
    naive_loss = 25 * naive[0] + 25 * naive[1] + 1 * naive[2]
    assert_close(loss, naive_loss)
    assert_close(grads(loss, z1, z2), grads(naive_loss, z1, z2))


def test_losses_reject_mismatched_or_too_small_batches() -> None:
    with pytest.raises(ValueError, match="same shape"):
        barlow_twins_loss(torch.randn(4, 3), torch.randn(4, 5))
    with pytest.raises(ValueError, match="at least 2 rows"):
        vicreg_terms(torch.randn(1, 3), torch.randn(1, 3))
    with pytest.raises(ValueError, match="at least 2 rows"):
        barlow_twins_loss(torch.randn(1, 3), torch.randn(1, 3))
    with pytest.raises(ValueError, match="same shape"):
        byol_loss(torch.randn(4, 3), torch.randn(3, 3))


# -- across processes -------------------------------------------------------------------------------


def test_two_processes_equal_one_process_for_all_three_methods(tmp_path) -> None:
    """One 2-process job: for BYOL, Barlow Twins and VICReg, with global BN in backbone and projector, loss,
    DDP-averaged gradients and BN running statistics of 2 x B equal 1 x 2B (float64; see the worker)."""
    run_workers(WORKERS_DIR / "noncontrastive_worker.py", str(tmp_path), nprocs=2, timeout=300)
    for r in range(2):
        record = json.loads((tmp_path / f"rank{r}.json").read_text())
        assert record["rank"] == r and record["world_size"] == 2 and record["num_processes"] == 2
        assert set(record["checks"]) == {"byol", "barlow_twins", "vicreg"}
        failed = {k: v for k, v in record["checks"].items() if v != "ok"}
        assert not failed, failed


# -- BYOL's target ----------------------------------------------------------------------------------


def test_byol_target_gets_no_gradient_and_follows_the_cosine_ema() -> None:
    torch.manual_seed(0)
    model = BYOL(tiny_backbone(), BYOLConfig(proj_hidden_dim=8, proj_out_dim=4, pred_hidden_dim=8, momentum=0.9))
    target = [*model.target_encoder.parameters(), *model.target_projector.parameters()]
    online = [*model.encoder.parameters(), *model.projector.parameters()]
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    assert all(not p.requires_grad for p in target)
    assert {id(p) for p in target}.isdisjoint({id(p) for g in optimizer.param_groups for p in g["params"]})
    views = [torch.randn(8, 3, 6, 6), torch.randn(8, 3, 6, 6)]
    for step, progress in enumerate([0.0, 0.5]):
        before = [p.detach().clone() for p in target]
        model(([*views], None)).loss.backward()
        assert all(p.grad is None for p in target)
        optimizer.step()
        optimizer.zero_grad()
        model.after_step(progress)
        m = cosine_momentum(progress, 0.9)
        assert math.isclose(m, [0.9, 0.95][step])  # tau = 1 - (1 - tau_base)(cos(pi p) + 1) / 2
        for t, b, o in zip(target, before, online):
            assert_close(t, m * b + (1 - m) * o.detach())
    assert any(not torch.equal(t, o) for t, o in zip(target, online))  # it lags, not copies
    model.after_step(1.0)  # tau = 1 at the end: the target stops moving
    frozen = [p.clone() for p in target]
    model.after_step(1.0)
    assert all(torch.equal(a, b) for a, b in zip(frozen, target))


@pytest.mark.parametrize("cls, config", [
    (BYOL, lambda **kw: BYOLConfig(proj_hidden_dim=8, proj_out_dim=4, pred_hidden_dim=8, **kw)),
    (BarlowTwins, lambda **kw: BarlowTwinsConfig(proj_hidden_dim=8, proj_out_dim=4, **kw)),
    (VICReg, lambda **kw: VICRegConfig(proj_hidden_dim=8, proj_out_dim=4, **kw)),
])
def test_sync_bn_makes_every_batch_norm_global_and_unset_keeps_plain_bn_on_one_process(cls, config) -> None:
    def norms(model):
        return [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]

    synced = cls(tiny_backbone(), config(sync_bn=True))
    assert len(norms(synced)) >= 2 and all(isinstance(m, GlobalBatchNorm) for m in norms(synced))
    plain = cls(tiny_backbone(), config())  # unset: global BN only with several processes
    assert not any(isinstance(m, GlobalBatchNorm) for m in norms(plain))
    assert synced.state_dict().keys() == plain.state_dict().keys()  # exported weights keep their names
    x = [torch.randn(6, 3, 6, 6), torch.randn(6, 3, 6, 6)]
    torch.manual_seed(0)
    plain.load_state_dict(synced.state_dict())
    assert_close(synced((x, None)).loss, plain((x, None)).loss)  # one process: global BN is plain BN


# -- configs ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("method, bad", [
    ("byol", {"momentum": 1.5}),
    ("barlow_twins", {"off_diagonal_weight": -1.0}),
    ("vicreg", {"variance_weight": -25.0}),
    ("vicreg", {"proj_layers": 0}),
])
def test_bad_method_values_name_the_key(method: str, bad: dict) -> None:
    key = next(iter(bad))
    with pytest.raises(ConfigError, match=f"method.{key}"):
        from_dict({"method": {"name": method, **bad}})


@pytest.mark.parametrize("method, expected", [
    ("byol", {"name": "lars", "lr": 0.2, "weight_decay": 1.5e-6}),
    ("barlow_twins", {"name": "lars", "lr": 0.2, "weight_decay": 1.5e-6}),
    ("vicreg", {"name": "lars", "lr": 0.2, "weight_decay": 1e-6}),
])
def test_optimizer_recipe_is_the_papers_lars(method: str, expected: dict) -> None:
    optim = from_dict({"method": {"name": method}}).optim
    assert {k: getattr(optim, k) for k in expected} == expected and optim.warmup_epochs == 10.0


# -- end to end -------------------------------------------------------------------------------------

E2E = {
    "byol": {"name": "byol", "proj_hidden_dim": 64, "proj_out_dim": 32, "pred_hidden_dim": 64, "momentum": 0.9},
    "barlow_twins": {"name": "barlow_twins", "proj_hidden_dim": 64, "proj_out_dim": 64},
    "vicreg": {"name": "vicreg", "proj_hidden_dim": 64, "proj_out_dim": 64},
}


@pytest.mark.slow
@pytest.mark.parametrize("method", list(E2E))
def test_trains_exports_and_reloads_bit_identically(tmp_path, method: str) -> None:
    cfg = from_dict(tiny_config_dict(tmp_path, method=E2E[method], train={"max_steps": 16},
                                     optim={"name": "lars", "lr": 0.4, "weight_decay": 1e-6, "warmup_epochs": 0}))
    run_dir = run_dir_for(cfg)
    run_dir.mkdir(parents=True)
    torch.manual_seed(0)
    model, train_set, _ = build_pretraining(cfg)
    result = fit(model, make_loader(train_set, cfg.data, seed=0), cfg, make_accelerator(cfg, run_dir), run_dir=run_dir)
    assert result.steps == 16
    losses = list(read_losses(run_dir).values())
    assert len(losses) == 16 and all(math.isfinite(v) for v in losses)
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4, losses  # falling

    save_encoder(model.encoder, tmp_path / "encoder", method=method, data={"image_size": 16})
    loaded, meta = load_encoder(tmp_path / "encoder")
    assert meta["method"] == method
    x = torch.randn(5, 3, 16, 16)
    model.encoder.eval(), loaded.eval()
    with torch.no_grad():
        assert torch.equal(model.encoder(x), loaded(x))
