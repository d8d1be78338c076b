"""The Python API: `import selfsup` stays light, pretrain -> Run -> evaluate in three lines on a tiny config,
overrides as section__key, and engine.fit creating the run directory it writes to."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import selfsup
from selfsup.api import dotted_overrides
from selfsup.config import ConfigError
from tests.conftest import ROOT, read_losses, tiny_config_dict

EVAL = dict(max_train=64, max_test=32, data__num_samples=128, data__num_classes=4, data__num_workers=0,
            eval__knn_k=5, eval__batch_size=32)


def test_import_selfsup_is_light_until_an_attribute_is_used():
    code = ("import sys, selfsup; heavy = lambda: sorted(m for m in ('torch', 'timm', 'accelerate') if m in sys.modules); "
            "print(heavy()); selfsup.create_backbone; print(heavy())")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    before, after = out.stdout.splitlines()
    assert before == "[]" and "torch" in after and "timm" in after
    with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
        selfsup.nonexistent  # noqa: B018


def test_overrides_are_section_double_underscore_key():
    assert dotted_overrides({"backbone.kwargs.in_chans": 1}, {"optim__lr": 0.3, "data__dataset": "synthetic"}) == [
        "backbone.kwargs.in_chans=1", "optim.lr=0.3", 'data.dataset="synthetic"']
    with pytest.raises(ConfigError, match="section__key"):
        dotted_overrides(None, {"lr": 0.3})


def test_three_lines_pretrain_then_evaluate(tmp_path, capsys):
    run = selfsup.pretrain(tiny_config_dict(tmp_path), train__max_steps=3)
    knn = selfsup.evaluate(run, "synthetic", protocol="knn", train__output_dir=str(tmp_path / "evals"), **EVAL)

    assert run.run_dir == tmp_path / "runs" / "tiny" and run.summary["steps"] == 3
    assert sorted(read_losses(run.run_dir)) == [1, 2, 3]  # the override reached the run
    assert json.loads((run.run_dir / "summary.json").read_text()) == run.summary
    assert knn["tool"] == "knn" and 0 <= knn["top1"] <= knn["top5"] <= 100
    assert knn["train_size"] == 64 and knn["test_size"] == 32 and knn["encoder"] == str((run.run_dir / "encoder").resolve())

    # run.encoder is the exported encoder, loaded lazily; scoring the module gives the same figure
    assert "encoder" not in vars(run)
    x = torch.randn(2, 3, 16, 16)
    reloaded, _ = selfsup.load_encoder(run.run_dir / "encoder")
    with torch.no_grad():
        assert torch.equal(run.encoder.eval()(x), reloaded.eval()(x))
    same = selfsup.evaluate(run.encoder, "synthetic", protocol="knn", image_size=16, **EVAL)
    assert same["top1"] == knn["top1"] and same["top5"] == knn["top5"]

    probe = selfsup.evaluate(run, "synthetic", protocol="linear_probe", train__epochs=1, data__batch_size=32,
                             train__output_dir=str(tmp_path / "evals"), **EVAL)
    assert probe["tool"] == "linear_probe" and 0 <= probe["top1"] <= 100
    assert selfsup.Run.load(run.run_dir).summary == run.summary


def test_evaluate_raises_instead_of_exiting(tmp_path):
    with pytest.raises(ValueError, match="protocol 'svm'"):
        selfsup.evaluate("resnet18_small", "synthetic", protocol="svm")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        selfsup.evaluate(str(tmp_path / "missing" / "encoder"), "synthetic")


def test_fit_creates_the_run_directory_it_writes_to(tmp_path):
    from selfsup.builders import build_pretraining
    from selfsup.config import from_dict
    from selfsup.engine import fit, make_accelerator, make_loader

    cfg = from_dict(tiny_config_dict(tmp_path, train={"max_steps": 2}))
    run_dir = tmp_path / "not" / "yet" / "there"
    method, train_set, _ = build_pretraining(cfg)
    result = fit(method, make_loader(train_set, cfg.data, seed=0), cfg, make_accelerator(cfg), run_dir=run_dir)
    assert result.steps == 2 and sorted(read_losses(run_dir)) == [1, 2]
