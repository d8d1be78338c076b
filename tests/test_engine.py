"""The engine's start line: what a run's batch is, for the optimizer and for the objective."""

from __future__ import annotations

import torch

from selfsup.builders import build_pretraining, run_dir_for
from selfsup.config import from_dict
from selfsup.engine import fit, make_accelerator, make_loader
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
    import pytest

    cfg = from_dict(tiny_config_dict(tmp_path, data={"num_samples": 16}))
    run_dir = run_dir_for(cfg)
    run_dir.mkdir(parents=True)
    method, train_set, _ = build_pretraining(cfg)
    with pytest.raises(ValueError, match="fewer images than one global batch") as info:
        fit(method, make_loader(train_set, cfg.data, seed=0), cfg, make_accelerator(cfg, run_dir), run_dir=run_dir)
    message = str(info.value)
    assert "(16 images)" in message and "32 = data.batch_size 32 x 1 processes x 1 accumulation steps" in message
    assert "None" not in message
