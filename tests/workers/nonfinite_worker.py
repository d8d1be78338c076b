"""Two processes, a NaN loss on rank 1 only: both ranks must stop with NonFiniteLossError (none hangs).

Run through `tests/multiproc.run_workers`; writes `rank<r>.json` into the directory given as argv[1].
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # this checkout's selfsup and tests

from selfsup.builders import build_pretraining, run_dir_for
from selfsup.config import from_dict
from selfsup.engine import NonFiniteLossError, fit, make_accelerator, make_loader
from selfsup.methods.base import StepOutput
from selfsup.methods.simclr import SimCLR
from tests.conftest import tiny_config_dict


class NaNOnRankOne(SimCLR):
    calls = 0

    def forward(self, batch):
        NaNOnRankOne.calls += 1
        out = super().forward(batch)
        if self.rank == 1 and NaNOnRankOne.calls == 3:
            return StepOutput(out.loss * float("nan"), out.metrics)
        return out


def main(out_dir: Path) -> None:
    method = {"name": "tests.workers.nonfinite_worker:NaNOnRankOne", "proj_hidden_dim": 32, "proj_out_dim": 16}
    cfg = from_dict(tiny_config_dict(out_dir, method=method, data={"batch_size": 8},
                                     train={"max_steps": 6, "log_every_steps": 2, "checkpoint_every_steps": 2}))
    accelerator = make_accelerator(cfg, run_dir_for(cfg))
    assert accelerator.num_processes == 2, accelerator.num_processes
    run_dir = run_dir_for(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    method, train_set, _ = build_pretraining(cfg)
    method.rank = accelerator.process_index
    message = None
    try:
        fit(method, make_loader(train_set, cfg.data, seed=0), cfg, accelerator, run_dir=run_dir)
    except NonFiniteLossError as e:
        message = str(e)
    record = {"rank": accelerator.process_index, "message": message}
    (out_dir / f"rank{accelerator.process_index}.json").write_text(json.dumps(record))
    accelerator.free_memory()
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
