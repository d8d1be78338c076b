"""Shared fixtures: tiny configs that train in seconds on 2 CPU cores, and a clean Accelerate state."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# a ResNet-18 small variant at a quarter of the width: same code path, a fraction of the cost
TINY_RESNET = {"name": "resnet18_small", "kwargs": {"channels": [16, 32, 64, 128], "stem_width": 16}}


def tiny_config_dict(tmp_path: Path, method: dict | None = None, **sections) -> dict:
    cfg = {
        "data": {"dataset": "synthetic", "image_size": 16, "batch_size": 32, "num_workers": 0,
                 "num_samples": 256, "num_classes": 4},
        "backbone": dict(TINY_RESNET),
        "method": method or {"name": "simclr", "proj_hidden_dim": 64, "proj_out_dim": 32, "temperature": 0.2},
        "optim": {"name": "sgd", "lr": 0.3, "warmup_epochs": 0, "weight_decay": 1e-5},
        "train": {"epochs": 1, "max_steps": 8, "log_every_steps": 1, "checkpoint_every_steps": 100,
                  "output_dir": str(tmp_path / "runs"), "run_name": "tiny", "seed": 0},
        "eval": {"every_epochs": 0, "at_end": False},
    }
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    return cfg


def write_config(tmp_path: Path, cfg: dict, name: str = "tiny.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return path


def read_metrics(run_dir: Path) -> list[dict]:
    """The records of a run's metrics.jsonl, in order."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def read_losses(run_dir: Path) -> dict[int, float]:
    """step -> logged loss."""
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Accelerate keeps process-wide singletons; each in-process run starts from a clean one."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
