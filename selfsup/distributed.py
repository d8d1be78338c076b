"""Thin torch.distributed helpers: the only module that asks for the rank.

Every helper is the identity (or a constant) when torch.distributed is not initialised or the
world size is 1, so methods and losses call them unconditionally and run unchanged on one CPU.

The differentiable gather is written by hand (a 20-line autograd.Function over public c10d
collectives) because the library ones fall short: Accelerate's `gather` has no backward, and
`torch.distributed.nn.functional.all_gather` is deprecated and, on gloo, returns wrong gradients
when the incoming gradient is non-contiguous (e.g. after `einsum`/`q @ k.T`; its backward
scatters into `empty_like` buffers that keep a transposed layout). `tests/test_distributed.py`
checks ours against a single process in two real gloo processes.

All gathers require the same shape on every rank (in particular the same N): a collective with
mismatched shapes hangs or fails inside the backend, and checking first would cost an extra
collective per call. Use `drop_last=True` (or equal per-process batches) in the DataLoader.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "is_distributed", "world_size", "rank", "gather_with_grad", "gather_no_grad", "all_reduce_mean",
    "shuffle_batch", "unshuffle_batch", "print_once",
]


def is_distributed() -> bool:
    """True when a process group with more than one process is active; collectives are needed."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """Number of processes W; 1 without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def rank() -> int:
    """This process's index in [0, W); 0 without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return 0


def print_once(message: str) -> None:
    """Print on process 0 only (e.g. a method's start-up line), so W processes do not repeat it."""
    if rank() == 0:
        print(message, flush=True)


# torch 2.14 renamed the single-tensor collectives; keep working on older releases (>= 2.4).
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _all_gather_rows(x: Tensor) -> Tensor:
    """Collective concatenation along dim 0 in rank order: `[N, ...] -> [W*N, ...]`."""
    x = x.contiguous()
    out = x.new_empty((dist.get_world_size() * x.shape[0], *x.shape[1:]))  # [W*N, ...]
    _all_gather_single(out, x)
    return out


class _GatherWithGrad(torch.autograd.Function):
    """all_gather forward, reduce-scatter(SUM) backward: the adjoint of the gather."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        return _all_gather_rows(x)  # x: [N, ...] -> [W*N, ...]

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        grad = grad.contiguous()  # [W*N, ...]; collectives read raw memory, strides must be plain
        out = grad.new_empty((grad.shape[0] // dist.get_world_size(), *grad.shape[1:]))  # [N, ...]
        _reduce_scatter_single(out, grad, op=dist.ReduceOp.SUM)  # sum over ranks of rows r*N:(r+1)*N
        return out


def gather_with_grad(x: Tensor) -> Tensor:
    """Concatenate x from every process in rank order, passing gradients back to each input.

    `[N, ...] -> [W*N, ...]`; the identity at world size 1. Needs the same shape on every rank,
    and every rank must backpropagate through its result (the backward is a collective too).

    Gradient semantics: the backward of rank r receives the SUM over all ranks of the gradient
    of their losses w.r.t. rows `r*N:(r+1)*N` of the gathered tensor. So if each rank's loss is
    the mean over its own N anchors, the gradient reaching x is W times the gradient of the
    global mean loss over W*N anchors; DDP then averages parameter gradients over the W ranks,
    which cancels the W: the parameter gradient equals that of a single process with the W*N
    batch and the mean loss. Do not rescale the loss by W.
    """
    if not is_distributed():
        return x
    return _GatherWithGrad.apply(x)  # x: [N, ...] -> [W*N, ...]


@torch.no_grad()
def gather_no_grad(x: Tensor) -> Tensor:
    """Concatenate x from every process in rank order, detached (e.g. keys for MoCo's queue).

    `[N, ...] -> [W*N, ...]`; returns `x.detach()` at world size 1. Needs the same shape on every rank.
    """
    if not is_distributed():
        return x.detach()
    return _all_gather_rows(x.detach())  # x: [N, ...] -> [W*N, ...]


@torch.no_grad()
def shuffle_batch(x: Tensor) -> tuple[Tensor, Tensor | None]:
    """Shuffle-BN (He et al. 2020, MoCo Sec. 3.3): this process's share of a random permutation of the global batch.

    Per-process BatchNorm would otherwise normalise a key with statistics of the very samples whose
    queries share that process, which leaks the positive pair. Returns `(x_shuffled, permutation)`:
    `x: [N, ...] -> [N, ...]` rows `permutation[r*N:(r+1)*N]` of the gathered `[W*N, ...]` batch, and
    the permutation `[W*N]` (the same on every rank, drawn on rank 0) for `unshuffle_batch`. Detached.
    At world size 1 it returns `(x, None)`: one process's BN already sees the whole batch.
    """
    if not is_distributed():
        return x, None
    n, r = x.shape[0], dist.get_rank()
    x_all = _all_gather_rows(x.detach())  # [N, ...] -> [W*N, ...]
    # Every rank draws (keeping RNG streams in step), rank 0's draw wins.
    permutation = torch.randperm(x_all.shape[0], device=x.device)  # [W*N]
    dist.broadcast(permutation, src=0)
    return x_all[permutation[r * n : (r + 1) * n]], permutation  # [N, ...], [W*N]


@torch.no_grad()
def unshuffle_batch(y: Tensor, permutation: Tensor | None) -> Tensor:
    """Inverse of `shuffle_batch` on its outputs: row i of the result belongs to local sample i again.

    `y: [N, ...]` computed from the shuffled batch -> `[N, ...]` in the original order; detached.
    The identity when `permutation` is None (world size 1).
    """
    if permutation is None:
        return y
    n, r = y.shape[0], dist.get_rank()
    y_all = _all_gather_rows(y.detach())  # [N, ...] -> [W*N, ...], row j holds sample permutation[j]
    inverse = torch.argsort(permutation)  # [W*N]: inverse[permutation[j]] = j
    return y_all[inverse[r * n : (r + 1) * n]]  # [N, ...]


@torch.no_grad()
def all_reduce_mean(x: Tensor) -> Tensor:
    """Mean of x over all processes as a new detached tensor, e.g. to log one loss for the run.

    Integer tensors come back as float64 at every world size, so the mean is exact and the dtype
    does not depend on W.
    """
    out = x.detach().clone()
    if not (out.is_floating_point() or out.is_complex()):
        out = out.double()
    if not is_distributed():
        return out
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / dist.get_world_size()
