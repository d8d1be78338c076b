"""Two-process check that gathered contrastive losses match one process with the global batch.

Run through `tests/multiproc.run_workers`; writes `rank<r>.json` into the directory given as argv[1].
Every rank builds the same global batch (same seed), takes its slice, and compares its gradients
with a single-process reference computed on the full batch in the same process.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from torch import nn
from torch.testing import assert_close

from selfsup.distributed import all_reduce_mean, gather_no_grad, gather_with_grad
from selfsup.losses import info_nce, nt_xent
from tests.workers.harness import finish, start

B, C, D = 4, 8, 6  # per-process batch, embedding dim, input dim of the DDP check


def global_batch(seed: int, *shape: int) -> torch.Tensor:
    """Identical on every rank: the single-process batch the W processes split."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def local_leaf(x_global: torch.Tensor, r: int) -> torch.Tensor:
    return x_global[r * B : (r + 1) * B].clone().requires_grad_(True)  # [W*B, ...] -> [B, ...]


def check_nt_xent_grad(w: int, r: int) -> None:
    z1g, z2g = global_batch(0, w * B, C), global_batch(1, w * B, C)  # [W*B, C]
    z1, z2 = local_leaf(z1g, r), local_leaf(z2g, r)  # [B, C]
    loss = nt_xent(z1, z2, z1_all=gather_with_grad(z1), z2_all=gather_with_grad(z2), offset=r * B)
    loss.backward()

    ref1, ref2 = z1g.clone().requires_grad_(True), z2g.clone().requires_grad_(True)
    ref_loss = nt_xent(ref1, ref2)
    ref_loss.backward()
    rows = slice(r * B, (r + 1) * B)
    # Local anchors' mean loss, averaged over ranks, is the global mean loss.
    assert_close(all_reduce_mean(loss.detach()), ref_loss.detach())
    # Backward sums every rank's gradient into this rank's rows: W x the global mean's gradient.
    assert_close(z1.grad, w * ref1.grad[rows])
    assert_close(z2.grad, w * ref2.grad[rows])


def check_info_nce_grad(w: int, r: int) -> None:
    """MoCo v3 style: local queries against the keys of every process, positive at offset + i."""
    qg, kg = global_batch(2, w * B, C), global_batch(3, w * B, C)  # [W*B, C]
    q, k = local_leaf(qg, r), local_leaf(kg, r)  # [B, C]
    positive_index = r * B + torch.arange(B)  # [B]
    loss = info_nce(q, gather_with_grad(k), temperature=0.2, positive_index=positive_index)
    loss.backward()

    ref_q, ref_k = qg.clone().requires_grad_(True), kg.clone().requires_grad_(True)
    ref_loss = info_nce(ref_q, ref_k, temperature=0.2)
    ref_loss.backward()
    rows = slice(r * B, (r + 1) * B)
    assert_close(all_reduce_mean(loss.detach()), ref_loss.detach())
    assert_close(q.grad, w * ref_q.grad[rows])
    assert_close(k.grad, w * ref_k.grad[rows])


def check_gather_no_grad(w: int, r: int) -> None:
    xg = global_batch(4, w * B, C)  # [W*B, C]
    gathered = gather_no_grad(local_leaf(xg, r))  # [B, C] -> [W*B, C]
    float_mean = all_reduce_mean(torch.tensor(float(r), dtype=torch.float64))
    int_mean = all_reduce_mean(torch.tensor(r))  # integers are promoted, not truncated
    mean_rank = torch.tensor((w - 1) / 2, dtype=torch.float64)
    assert not gathered.requires_grad, "gather_no_grad must return a detached tensor"
    assert_close(gathered, xg)  # rank order
    assert_close(float_mean, mean_rank)
    assert_close(int_mean, mean_rank)


def check_gather_grad_closed_form(w: int, r: int) -> None:
    """Gradient of sum(A_r @ X.T) w.r.t. rank r's rows is sum over ranks of A_r's column sums.

    The incoming gradient is transposed (non-contiguous), the layout that breaks
    torch.distributed.nn.functional.all_gather on gloo.
    """
    x = torch.randn(B, C, dtype=torch.float64, requires_grad=True)  # [B, C]
    a = global_batch(10 + r, 3, C)  # rank-specific weights A_r: [3, C]
    (a @ gather_with_grad(x).T).sum().backward()  # A_r: [3, C], X: [W*B, C] -> [3, W*B]
    column_sums = sum(global_batch(10 + s, 3, C).sum(0) for s in range(w))  # [C]
    assert_close(x.grad, column_sums.expand(B, C))


def check_ddp_end_to_end(w: int, r: int, accelerator: Accelerator) -> None:
    """DDP's mean over ranks undoes the gather's sum: parameter grads equal the single-process ones."""
    torch.manual_seed(5)
    linear = nn.Linear(D, C).double()
    reference = copy.deepcopy(linear)  # unwrapped copy, sees the full batch
    model = accelerator.prepare(linear)

    x1g, x2g = global_batch(6, w * B, D), global_batch(7, w * B, D)  # [W*B, D]
    rows = slice(r * B, (r + 1) * B)
    h = model(torch.cat([x1g[rows], x2g[rows]]))  # [2B, D] -> [2B, C]
    h1, h2 = h[:B], h[B:]  # [B, C] each
    loss = nt_xent(h1, h2, z1_all=gather_with_grad(h1), z2_all=gather_with_grad(h2), offset=r * B)
    accelerator.backward(loss)

    ref_h = reference(torch.cat([x1g, x2g]))  # [2*W*B, D] -> [2*W*B, C]
    nt_xent(ref_h[: w * B], ref_h[w * B :]).backward()
    unwrapped = accelerator.unwrap_model(model)
    assert_close(unwrapped.weight.grad, reference.weight.grad)
    assert_close(unwrapped.bias.grad, reference.bias.grad)


def check_simclr_global_bn(w: int, r: int, accelerator: Accelerator) -> None:
    """SimCLR with BN in train mode (backbone and projector): 2 processes x B, DDP, equal 1 process x 2B in
    loss, parameter gradients and BN running statistics (SimCLR Sec. 2.2 global BN, on gloo)."""
    from selfsup.batchnorm import GlobalBatchNorm
    from selfsup.methods.simclr import SimCLR, SimCLRConfig

    torch.manual_seed(8)
    backbone = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    backbone.embed_dim = 6
    reference = SimCLR(copy.deepcopy(backbone), SimCLRConfig(sync_bn=False, proj_hidden_dim=8, proj_out_dim=4,
                                                              temperature=0.5)).double()
    method = SimCLR(backbone, SimCLRConfig(proj_hidden_dim=8, proj_out_dim=4, temperature=0.5)).double()  # sync unset
    norms = [m for m in method.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert len(norms) == 3 and all(isinstance(m, GlobalBatchNorm) for m in norms), norms  # f, g hidden, g output
    reference.load_state_dict(method.state_dict())
    model = accelerator.prepare(method)

    v1g, v2g = global_batch(20, w * B, 3, 6, 6), global_batch(21, w * B, 3, 6, 6)  # [W*B, 3, 6, 6]
    rows = slice(r * B, (r + 1) * B)
    loss = model(([v1g[rows], v2g[rows]], None)).loss
    accelerator.backward(loss)

    # one process, the whole batch: one pass over both views, NT-Xent without any gather
    z = reference.projector(reference.encoder(torch.cat([v1g, v2g]))).view(2, w * B, -1)  # [2, W*B, D]
    ref_loss = nt_xent(z[0], z[1], 0.5)
    ref_loss.backward()
    assert_close(all_reduce_mean(loss.detach()), ref_loss.detach())
    unwrapped = accelerator.unwrap_model(model)
    for (name, p), (_, q) in zip(unwrapped.named_parameters(), reference.named_parameters()):
        assert_close(p.grad, q.grad, msg=lambda m: f"{name}: {m}")
    for (name, a), (_, b) in zip(unwrapped.named_buffers(), reference.named_buffers()):
        assert_close(a.to(b.dtype), b, msg=lambda m: f"{name}: {m}")


def main(out_dir: Path) -> None:
    accelerator, w, r = start(nprocs=2)
    finish(accelerator, out_dir, {
        "nt_xent_grad": lambda: check_nt_xent_grad(w, r),
        "info_nce_grad": lambda: check_info_nce_grad(w, r),
        "gather_grad_closed_form": lambda: check_gather_grad_closed_form(w, r),
        "gather_no_grad": lambda: check_gather_no_grad(w, r),
        "ddp_end_to_end": lambda: check_ddp_end_to_end(w, r, accelerator),
        "simclr_global_bn": lambda: check_simclr_global_bn(w, r, accelerator),
    })


if __name__ == "__main__":
    main(Path(sys.argv[1]))
