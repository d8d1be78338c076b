"""A NaN loss stops the run (its step named, no checkpoint of the bad weights) without a host sync per step,
or is skipped and counted with train.skip_nonfinite."""

import json

import pytest

from selfsup.builders import build_pretraining, run_dir_for
from selfsup.checkpoints import list_checkpoints
from selfsup.config import from_dict
from selfsup.engine import NonFiniteLossError, fit, make_accelerator, make_loader
from selfsup.methods.base import StepOutput
from selfsup.methods.simclr import SimCLR
from tests.conftest import read_metrics, tiny_config_dict
from tests.multiproc import WORKERS_DIR, run_workers

NAN_AT_CALL = 3
_calls = 0


class NaNAtThirdCall(SimCLR):
    def forward(self, batch):
        global _calls
        _calls += 1
        out = super().forward(batch)
        return StepOutput(out.loss * float("nan"), out.metrics) if _calls == NAN_AT_CALL else out


def _run(tmp_path, **train):
    global _calls
    _calls = 0
    method = {"name": "tests.test_nonfinite:NaNAtThirdCall", "proj_hidden_dim": 32, "proj_out_dim": 16}
    cfg = from_dict(tiny_config_dict(tmp_path, method=method, data={"batch_size": 16},
                                     train={"max_steps": 6, "log_every_steps": 2, "checkpoint_every_steps": 2, **train}))
    run_dir = run_dir_for(cfg)
    run_dir.mkdir(parents=True)
    method, train_set, _ = build_pretraining(cfg)
    return run_dir, fit(method, make_loader(train_set, cfg.data, seed=0), cfg, make_accelerator(cfg, run_dir), run_dir=run_dir)


def test_nan_loss_stops_before_anything_is_saved_and_names_its_step(tmp_path):
    with pytest.raises(NonFiniteLossError, match="at step 3;.*step_00000002"):
        _run(tmp_path)
    run_dir = tmp_path / "runs" / "tiny"
    assert [p.name for p in list_checkpoints(run_dir / "checkpoints")] == ["step_00000002"]
    logged = [r["step"] for r in read_metrics(run_dir)]
    assert logged == [2]  # the NaN is never logged: the check runs before the step-4 log


def test_skip_nonfinite_skips_and_counts(tmp_path):
    run_dir, result = _run(tmp_path, skip_nonfinite=True)
    assert result.steps == 6 and result.skipped_nonfinite == 1
    records = read_metrics(run_dir)
    assert records[-1]["skipped_nonfinite"] == 1


def test_nan_on_one_process_stops_every_process(tmp_path):
    run_workers(WORKERS_DIR / "nonfinite_worker.py", str(tmp_path), nprocs=2)
    for r in range(2):
        record = json.loads((tmp_path / f"rank{r}.json").read_text())
        assert record["rank"] == r and "at step 3;" in record["message"], record
