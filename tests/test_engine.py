"""The engine: its start line (what a run's batch is, for the optimizer and for the objective) and its clipping."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from selfsup.builders import build_pretraining, run_dir_for
from selfsup.config import ConfigError, from_dict
from selfsup.engine import fit, make_accelerator, make_loader
from selfsup.methods.base import StepOutput
from selfsup.optim import clip_grad_per_parameter_
from tests.conftest import tiny_config_dict


def test_start_line_states_the_optimizer_batch_and_the_objective_batch_under_accumulation(tmp_path, capsys):
    """batch 32 x 1 process x 2 accumulation steps: the lr is scaled for 64 images, but SimCLR's negatives and
    BN statistics come from each forward of 32 (one micro-batch); the line must say both."""
    cfg = from_dict(tiny_config_dict(tmp_path, train={"max_steps": 1, "accumulate_steps": 2}))
    run_dir = run_dir_for(cfg)
    run_dir.mkdir(parents=True)
    torch.manual_seed(0)
    method, train_set, _ = build_pretraining(cfg)
    fit(method, make_loader(train_set, cfg.data, seed=0), cfg, make_accelerator(cfg, run_dir), run_dir=run_dir)
    lines = [line for line in capsys.readouterr().out.splitlines() if "per-process batch=" in line]
    assert len(lines) == 1, lines
    line = lines[0]
    assert "processes=1 per-process batch=32 accumulate=2" in line, line
    assert "global batch 64 (optimizer), 32 per objective (negatives, BN)" in line, line
    assert "lr = 0.3 x scaling 'linear' = 0.075" in line, line  # scaled by the optimizer's 64


def test_too_small_dataset_names_the_real_batch_size(tmp_path):
    """Before: "(32 = data.batch_size None x 1 processes ...)": the prepared loader has no batch_size."""
    cfg = from_dict(tiny_config_dict(tmp_path, data={"num_samples": 16}))
    run_dir = run_dir_for(cfg)
    run_dir.mkdir(parents=True)
    method, train_set, _ = build_pretraining(cfg)
    with pytest.raises(ValueError, match="fewer images than one global batch") as info:
        fit(method, make_loader(train_set, cfg.data, seed=0), cfg, make_accelerator(cfg, run_dir), run_dir=run_dir)
    message = str(info.value)
    assert "(16 images)" in message and "32 = data.batch_size 32 x 1 processes x 1 accumulation steps" in message
    assert "None" not in message


class _Regression(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = torch.nn.Linear(4, 6), torch.nn.Linear(6, 1)

    def forward(self, batch) -> StepOutput:
        x, y = batch
        return StepOutput(loss=100 * ((self.b(self.a(x)).squeeze(1) - y) ** 2).mean())

    def after_step(self, progress: float) -> None:
        pass


class _RecordingSGD(torch.optim.SGD):
    """SGD that keeps the gradients it is stepped with (after the engine's clipping)."""

    def step(self, closure=None):
        self.seen = [p.grad.clone() for group in self.param_groups for p in group["params"]]
        return super().step(closure)


@pytest.mark.parametrize("mode", ["norm", "per_parameter"])
def test_clipping_scales_all_gradients_together_or_each_on_its_own(tmp_path, mode):
    """`norm`: g * min(1, c / |all g|); `per_parameter` (DINO's utils.clip_gradients): g * min(1, c / |g|) each."""
    torch.manual_seed(0)
    x, y = torch.randn(8, 4), torch.randn(8)
    model = _Regression()
    reference = copy.deepcopy(model)
    reference((x, y)).loss.backward()
    raw = [p.grad for p in reference.parameters()]
    norms = torch.stack([g.norm() for g in raw])
    clip = norms.median().item()  # some parameters above it, some below
    if mode == "norm":
        expected = [g * min(1.0, clip / (norms.norm().item() + 1e-6)) for g in raw]
    else:
        expected = [g * min(1.0, clip / (g.norm().item() + 1e-6)) for g in raw]
        assert 0 < sum(not torch.equal(e, g) for e, g in zip(expected, raw)) < len(raw)
    cfg = from_dict(tiny_config_dict(tmp_path, train={"max_steps": 1, "clip_grad": clip, "clip_grad_mode": mode, "precision": "no"}))
    optimizer = _RecordingSGD(model.parameters(), lr=0.1)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    fit(model, loader, cfg, make_accelerator(cfg, run_dir_for(cfg)), run_dir=run_dir_for(cfg), optimizer=optimizer)
    for got, want in zip(optimizer.seen, expected):
        torch.testing.assert_close(got, want)


def test_per_parameter_clipping_equals_a_loop_and_bad_modes_name_the_key():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(n)) for n in (3, 5, 7)]
    for p, scale in zip(params, (0.1, 1.0, 10.0)):
        p.grad = torch.randn_like(p) * scale
    expected = []
    for p in params:  # facebookresearch/dino utils.py L132-141
        coef = 1.0 / (p.grad.norm().item() + 1e-6)
        expected.append(p.grad * coef if coef < 1 else p.grad.clone())
    clip_grad_per_parameter_(params, 1.0)
    for p, want in zip(params, expected):
        torch.testing.assert_close(p.grad, want)
    with pytest.raises(ConfigError, match="train.clip_grad_mode must be one of norm, per_parameter"):
        from_dict(tiny_config_dict(Path("."), train={"clip_grad_mode": "global"}))
