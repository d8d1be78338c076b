"""The frame every multi-check worker shares: 2 real processes, checks run in order, one record per rank.

A worker builds `start()`'s Accelerator, runs `finish(...)` with its named checks, and the test reads
`rank<r>.json` (rank, world size, check name -> "ok" or the traceback).
"""

from __future__ import annotations

import json
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

import torch.distributed as dist
from accelerate import Accelerator

from selfsup.distributed import rank, world_size


def start(nprocs: int = 2) -> tuple[Accelerator, int, int]:
    """The Accelerator on CPU (gloo), after asserting the launcher really started `nprocs` processes."""
    accelerator = Accelerator(cpu=True)
    assert accelerator.num_processes == nprocs, f"expected {nprocs} processes, got {accelerator.num_processes}"
    assert dist.is_initialized() and dist.get_world_size() == nprocs, f"torch.distributed world size is not {nprocs}"
    w, r = world_size(), rank()
    assert (w, r) == (dist.get_world_size(), dist.get_rank())
    return accelerator, w, r


def finish(accelerator: Accelerator, out_dir: Path, checks: dict[str, Callable[[], None]]) -> None:
    """Run every check, write this rank's record, tear gloo down cleanly; exit 1 if a check failed."""
    results: dict[str, str] = {}
    for name, check in checks.items():
        # Checks compare after their collectives, so a failure never leaves the other rank waiting.
        try:
            check()
            results[name] = "ok"
        except AssertionError:
            results[name] = traceback.format_exc()
    r = accelerator.process_index
    record = {"rank": r, "world_size": world_size(), "num_processes": accelerator.num_processes, "checks": results}
    (out_dir / f"rank{r}.json").write_text(json.dumps(record, indent=2))
    # Drop DDP's hold on the group, and let no rank close it while the other still talks.
    accelerator.free_memory()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if any(v != "ok" for v in results.values()):
        print(json.dumps(record, indent=2), file=sys.stderr)  # shown by run_workers on failure
        sys.exit(1)
