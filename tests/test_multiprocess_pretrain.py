"""pretrain.py itself in 2 real CPU processes (gloo), the way the README tells users to launch it."""

import json

from tests.conftest import ROOT, tiny_config_dict, write_config
from tests.multiproc import run_workers


def test_pretrain_runs_in_two_processes_and_exports(tmp_path):
    cfg = tiny_config_dict(tmp_path, data={"batch_size": 16}, train={"max_steps": 3, "checkpoint_every_steps": 2})
    proc = run_workers(ROOT / "pretrain.py", "--config", str(write_config(tmp_path, cfg)))
    out = proc.stdout + proc.stderr
    assert "world size 2" in out and "processes=2 per-process batch=16" in out and "global batch 32" in out, out
    run_dir = tmp_path / "runs" / "tiny"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 3
    assert (run_dir / "encoder" / "model.safetensors").is_file()
    assert [p.name for p in sorted((run_dir / "checkpoints").iterdir())] == ["step_00000002", "step_00000003"]
