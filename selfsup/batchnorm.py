"""Split BatchNorm (ghost BN) and a one-process batch shuffle: MoCo's shuffle-BN without several processes.

Shuffle-BN (MoCo Sec. 3.3) needs per-process BN over different subsets of the batch for a query and
its key. On one process BN sees the whole batch, so the MoCo authors' single-GPU CIFAR demo
(facebookresearch/moco `colab/moco_cifar10_demo.ipynb` at f736491, cell "Define base encoder",
`SplitBatchNorm`, and cell "Define MoCo wrapper", `_batch_shuffle_single_gpu`; `--bn-splits 8` by
default "to simulate 8 GPUs") normalises each of `num_splits` groups of the batch with its own
statistics and shuffles the key batch before the key encoder. Written here by hand (timm and torch
have no ghost BN); the module keeps `nn.BatchNorm*`'s parameter and buffer names, so its state dict
loads into a plain BN, and in eval mode it *is* plain BN on the running statistics.

Groups here are contiguous chunks, `x.chunk(num_splits)` (process r's share of a global batch); the
demo's `view(-1, C * num_splits, H, W)` groups samples i mod num_splits instead. Both are fixed
partitions of a randomly ordered batch, so they are the same in distribution.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["SplitBatchNorm", "convert_split_batchnorm", "GlobalBatchNorm", "convert_global_batchnorm", "make_batchnorm_global",
           "shuffle_rows", "unshuffle_rows"]


class SplitBatchNorm(_BatchNorm):
    """BatchNorm whose training-mode statistics come from each of `num_splits` equal chunks of the batch.

    Train mode: chunk s of `x: [N, C, *]` is normalised with its own mean and biased variance (as if it
    were the whole batch of one of `num_splits` processes); every chunk updates its own copy of the
    running statistics, and the module keeps their mean (the demo's semantics). Eval mode: plain BN.
    """

    def __init__(self, num_features: int, num_splits: int, **kwargs) -> None:
        super().__init__(num_features, **kwargs)
        if num_splits < 1:
            raise ValueError(f"num_splits must be >= 1, got {num_splits}")
        self.num_splits = num_splits

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected an [N, C, *] input, got shape {tuple(x.shape)}")

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, num_splits={self.num_splits}"

    def forward(self, x: Tensor) -> Tensor:  # x: [N, C, *]
        self._check_input_dim(x)
        if not self.training and self.track_running_stats:  # eval: the running statistics, as nn.BatchNorm
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        n, c, rest, s = x.shape[0], x.shape[1], x.shape[2:], self.num_splits
        if n % s:
            raise ValueError(f"SplitBatchNorm with num_splits={s} needs a batch divisible by {s}, got N={n}")
        factor = 0.0 if self.momentum is None else self.momentum
        tracking = self.training and self.track_running_stats
        if tracking:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average, as nn.BatchNorm
                factor = 1.0 / float(self.num_batches_tracked)
        # Each chunk's channels become channels of their own, so one batch_norm call normalises every chunk
        # with its own statistics: [N, C, *] -> [S, N/S, C, *] -> [N/S, S, C, *] -> [N/S, S*C, *]
        grouped = x.reshape(s, n // s, c, *rest).transpose(0, 1).reshape(n // s, s * c, *rest)
        mean = var = None
        if self.running_mean is not None:
            mean, var = self.running_mean.repeat(s), self.running_var.repeat(s)  # [S*C], updated in place below
        weight = self.weight.repeat(s) if self.weight is not None else None  # [S*C]
        bias = self.bias.repeat(s) if self.bias is not None else None  # [S*C]
        out = F.batch_norm(grouped, mean, var, weight, bias, True, factor, self.eps)  # [N/S, S*C, *]
        if tracking:  # each chunk updated its own copy; keep their mean: [S*C] -> [S, C] -> [C]
            with torch.no_grad():
                self.running_mean.copy_(mean.view(s, c).mean(dim=0))
                self.running_var.copy_(var.view(s, c).mean(dim=0))
        # back to the input's order: [N/S, S*C, *] -> [N/S, S, C, *] -> [S, N/S, C, *] -> [N, C, *]
        return out.reshape(n // s, s, c, *rest).transpose(0, 1).reshape(n, c, *rest)


class GlobalBatchNorm(_BatchNorm):
    """BatchNorm over the global batch of every process, with gradients through the shared statistics.

    SimCLR's global BN (Sec. 2.2) on any backend: torch's SyncBatchNorm has no CPU kernel, so CPU process
    groups (gloo) would otherwise keep per-process BN. Train mode: each process's count, mean and sum of
    squared deviations per channel are gathered with `gather_with_grad` and combined exactly (Chan et al.'s
    parallel variance), so W processes x B images give the outputs, running statistics and (after DDP's
    average) gradients of one process with W*B. At world size 1 and in eval mode it is plain BN.
    """

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected an [N, C, *] input, got shape {tuple(x.shape)}")

    def forward(self, x: Tensor) -> Tensor:  # x: [B, C, *]
        from selfsup.distributed import gather_with_grad, world_size

        self._check_input_dim(x)
        if not self.training or world_size() == 1:
            return super().forward(x)
        c = x.shape[1]
        dims = [0, *range(2, x.dim())]
        count = x.new_full((1, 1), x.numel() // c)  # [1, 1] values per channel here
        mean = x.mean(dim=dims)  # [C]
        m2 = ((x - mean.view(1, c, *[1] * (x.dim() - 2))) ** 2).sum(dim=dims)  # [C]
        stats = gather_with_grad(torch.cat([count, mean[None], m2[None]], dim=1))  # [1, 1+2C] -> [W, 1+2C]
        counts, means, m2s = stats[:, :1], stats[:, 1 : 1 + c], stats[:, 1 + c :]  # [W, 1], [W, C], [W, C]
        total = counts.sum()
        global_mean = (counts * means).sum(0) / total  # [C]
        global_m2 = (m2s + counts * (means - global_mean) ** 2).sum(0)  # [C]
        var = global_m2 / total  # biased, what the batch is normalised with
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
            with torch.no_grad():  # running variance is unbiased, as nn.BatchNorm
                self.running_mean.lerp_(global_mean.detach().to(self.running_mean.dtype), factor)
                unbiased = (global_m2 / (total - 1).clamp(min=1)).detach().to(self.running_var.dtype)
                self.running_var.lerp_(unbiased, factor)
        shape = (1, c, *[1] * (x.dim() - 2))
        out = (x - global_mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out


def convert_global_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm under `module` by a GlobalBatchNorm sharing its parameters and buffers
    (state-dict keys unchanged); returns the module, like `nn.SyncBatchNorm.convert_sync_batchnorm`."""
    return _convert(module, lambda bn: GlobalBatchNorm(bn.num_features, eps=bn.eps, momentum=bn.momentum,
                                                       affine=bn.affine, track_running_stats=bn.track_running_stats))


def make_batchnorm_global(module: nn.Module) -> nn.Module:
    """Every BN under `module` normalises over the global batch: SyncBatchNorm on accelerator process groups,
    GlobalBatchNorm on CPU ones (gloo, where SyncBatchNorm has no kernel) and without a process group. In place."""
    import torch.distributed as dist

    from selfsup.distributed import is_distributed

    if is_distributed() and dist.get_backend() != "gloo":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return convert_global_batchnorm(module)


def convert_split_batchnorm(module: nn.Module, num_splits: int) -> nn.Module:
    """Replace every BatchNorm{1,2,3}d under `module` by a SplitBatchNorm sharing its parameters and buffers.

    Returns the module (converted in place, or the new layer if `module` itself is a BN), like
    `nn.SyncBatchNorm.convert_sync_batchnorm`. State-dict keys are unchanged.
    """
    return _convert(module, lambda bn: SplitBatchNorm(bn.num_features, num_splits, eps=bn.eps, momentum=bn.momentum,
                                                      affine=bn.affine, track_running_stats=bn.track_running_stats))


def _convert(module: nn.Module, make: Callable[[_BatchNorm], _BatchNorm]) -> nn.Module:
    """Swap each plain BN under `module` for `make(bn)`, handing over its parameters and buffers."""
    if isinstance(module, _BatchNorm) and not isinstance(module, (SplitBatchNorm, GlobalBatchNorm, nn.SyncBatchNorm)):
        new = make(module)
        new.train(module.training)
        if module.affine:
            new.weight, new.bias = module.weight, module.bias
        new.running_mean, new.running_var = module.running_mean, module.running_var
        new.num_batches_tracked = module.num_batches_tracked
        return new
    for name, child in module.named_children():
        converted = _convert(child, make)
        if converted is not child:
            setattr(module, name, converted)
    return module


@torch.no_grad()
def shuffle_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """A random permutation of the batch rows, for split BN on one process. `x: [N, ...] -> ([N, ...], perm [N])`."""
    permutation = torch.randperm(x.shape[0], device=x.device)  # [N]
    return x[permutation], permutation


@torch.no_grad()
def unshuffle_rows(y: Tensor, permutation: Tensor) -> Tensor:
    """Inverse of `shuffle_rows` on its outputs: row i belongs to input row i again. `[N, ...] -> [N, ...]`."""
    return y[torch.argsort(permutation)]  # argsort: inverse[permutation[j]] = j
