"""distributed.py: identity at world size 1; in 2 real gloo processes, gathered losses match one process."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from selfsup.distributed import all_reduce_mean, gather_no_grad, gather_with_grad, rank, world_size
from selfsup.losses import nt_xent
from tests.multiproc import WORKERS_DIR, run_workers


def test_helpers_are_identity_without_process_group() -> None:
    assert not torch.distributed.is_initialized()
    assert (world_size(), rank()) == (1, 0)
    x = torch.randn(4, 3, requires_grad=True)
    assert gather_with_grad(x) is x  # gradients flow unchanged
    gathered = gather_no_grad(x)
    assert not gathered.requires_grad and torch.equal(gathered, x)
    mean = all_reduce_mean(x)
    assert torch.equal(mean, x) and mean.data_ptr() != x.data_ptr() and not mean.requires_grad
    assert all_reduce_mean(torch.tensor(3)).dtype == torch.float64  # int mean is exact, same dtype at any W


def test_gathered_nt_xent_at_world_size_one_is_plain_nt_xent() -> None:
    z1, z2 = torch.randn(5, 8), torch.randn(5, 8)
    gathered = nt_xent(z1, z2, z1_all=gather_with_grad(z1), z2_all=gather_with_grad(z2), offset=rank() * 5)
    torch.testing.assert_close(gathered, nt_xent(z1, z2))


def test_two_processes_match_single_process(tmp_path: Path) -> None:
    """Loss, input gradients (x W) and DDP parameter gradients equal the single-process run."""
    run_workers(WORKERS_DIR / "gather_grad_worker.py", str(tmp_path), nprocs=2)
    records = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r, record in enumerate(records):
        assert record["rank"] == r
        assert record["world_size"] == 2 and record["num_processes"] == 2
        assert set(record["checks"]) == {
            "nt_xent_grad",
            "info_nce_grad",
            "gather_grad_closed_form",
            "gather_no_grad",
            "ddp_end_to_end",
            "simclr_global_bn",
        }
        failed = {name: msg for name, msg in record["checks"].items() if msg != "ok"}
        assert not failed, f"rank {r} failed: " + "\n".join(f"{k}:\n{v}" for k, v in failed.items())
