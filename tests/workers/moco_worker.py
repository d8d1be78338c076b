"""Two-process MoCo checks: shuffle-BN helpers, a queue shared by both ranks, MoCo v3's global-batch loss.

Run through `tests/multiproc.run_workers` with the output directory as argv[1]; every rank writes
`rank<r>.json` (check name -> "ok" or the traceback), and rank 0 writes `v3_grads.safetensors`
and `v3_loss.json` for the single-process comparison done by tests/test_moco.py.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors.torch import save_file
from torch.testing import assert_close

from selfsup.backbones import create_backbone
from selfsup.distributed import all_reduce_mean, gather_no_grad, shuffle_batch, unshuffle_batch
from selfsup.methods.moco import MoCo, MoCoConfig
from tests.workers.harness import finish, start

B, IMAGE = 4, 16  # per-process batch, image size
V2_STEPS = 3


def tiny_vit() -> torch.nn.Module:
    """No BatchNorm anywhere: a sample's features do not depend on the rest of its batch."""
    return create_backbone("vit_tiny_patch4", img_size=IMAGE, depth=1, embed_dim=16, num_heads=2)


def tiny_moco(variant: str, **overrides) -> MoCo:
    torch.manual_seed(0)
    cfg = MoCoConfig(variant=variant, proj_hidden_dim=32, proj_out_dim=8, pred_hidden_dim=32, **overrides)
    return MoCo(tiny_vit(), cfg)


def global_views(seed: int, n: int, dtype=torch.float32) -> list[torch.Tensor]:
    """Two views of the global batch, identical on every rank: [n, 3, IMAGE, IMAGE] each."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 3, IMAGE, IMAGE, generator=g, dtype=dtype) for _ in range(2)]


def check_shuffle(w: int, r: int) -> None:
    x_global = torch.arange(w * B * 3, dtype=torch.float64).view(w * B, 3)  # [W*B, 3], row i = sample i
    x = x_global[r * B : (r + 1) * B]  # [B, 3]
    shuffled, permutation = shuffle_batch(x)
    assert permutation is not None and sorted(permutation.tolist()) == list(range(w * B))
    same = gather_no_grad(permutation.unsqueeze(0).double())  # [W, W*B]: each rank's permutation
    assert torch.equal(same[0], same[1]), "ranks drew different permutations"
    assert_close(shuffled, x_global[permutation[r * B : (r + 1) * B]])  # rows of the global batch
    assert_close(unshuffle_batch(shuffled * 2 + 1, permutation), x * 2 + 1)  # f(x) back in local order


def check_v2_queue(w: int, r: int, accelerator: Accelerator) -> None:
    """After every step both ranks hold the same queue: the keys of rank 0 then rank 1, FIFO, wrapping."""
    size = 2 * w * B
    assert V2_STEPS * w * B > size, "the check must see the pointer wrap around"
    model = tiny_moco("v2", queue_size=size, proj_batch_norm=False)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    unwrapped = accelerator.unwrap_model(model)
    expected = unwrapped.queue.clone()  # [K, D], the naive FIFO
    pointer = 0
    failures = []  # asserted after the loop, so a failure never leaves the other rank in a collective
    for step in range(V2_STEPS):
        x1g, x2g = global_views(100 + step, w * B)
        x1, x2 = x1g[r * B : (r + 1) * B], x2g[r * B : (r + 1) * B]
        step_keys = gather_no_grad(unwrapped.keys(x2))  # [W*B, D]; no BN, so batch-independent
        loss = model(([x1, x2], None)).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        unwrapped.after_step((step + 1) / V2_STEPS)
        for key in step_keys:  # one row at a time, the way a FIFO is defined
            expected[pointer] = key
            pointer = (pointer + 1) % size
        both = gather_no_grad(unwrapped.queue.unsqueeze(0))  # [W, K, D]
        if not torch.equal(both[0], both[1]):
            failures.append(f"step {step}: the ranks' queues differ")
        if int(unwrapped.queue_ptr) != pointer:
            failures.append(f"step {step}: queue_ptr {int(unwrapped.queue_ptr)} != {pointer}")
        if not torch.allclose(unwrapped.queue, expected, rtol=1e-5, atol=1e-6):
            failures.append(f"step {step}: queue differs from the FIFO of gathered keys")
    assert not failures, failures


def check_v3_loss_and_grads(w: int, r: int, accelerator: Accelerator, out_dir: Path) -> None:
    """Rank losses and DDP-averaged gradients, for test_moco to compare with 1 process x W*B.

    Eval mode: the heads' BN then normalises with running statistics, so each sample's embedding
    is independent of how the batch is split; in train mode per-process BN statistics differ
    from full-batch ones by design (the paper uses SyncBN). What remains is exactly the gather,
    the positive indexing (rank * N + i) and the 2 tau scaling.
    """
    model = tiny_moco("v3").double().eval()
    model = accelerator.prepare(model)
    x1g, x2g = global_views(7, w * B, torch.float64)
    rows = slice(r * B, (r + 1) * B)
    loss = model(([x1g[rows], x2g[rows]], None)).loss
    accelerator.backward(loss)
    mean_loss = all_reduce_mean(loss.detach())
    if r == 0:
        grads = {n: p.grad.contiguous() for n, p in accelerator.unwrap_model(model).named_parameters() if p.grad is not None}
        save_file(grads, str(out_dir / "v3_grads.safetensors"))
        (out_dir / "v3_loss.json").write_text(json.dumps({"mean_loss": mean_loss.item(), "world_size": w}))


def main(out_dir: Path) -> None:
    accelerator, w, r = start(nprocs=2)
    finish(accelerator, out_dir, {
        "shuffle": lambda: check_shuffle(w, r),
        "v2_queue": lambda: check_v2_queue(w, r, accelerator),
        "v3_loss_and_grads": lambda: check_v3_loss_and_grads(w, r, accelerator, out_dir),
    })


if __name__ == "__main__":
    main(Path(sys.argv[1]))
