"""Projection and prediction MLPs shared by the contrastive methods."""

from __future__ import annotations

from torch import nn


def mlp(
    in_dim: int,
    hidden_dim: int,
    out_dim: int,
    num_layers: int = 2,
    *,
    batch_norm: bool = True,
    last_batch_norm: bool = False,
    last_bias: bool | None = None,
) -> nn.Sequential:
    """Linear-(BN)-ReLU blocks then a final Linear; SimCLR / MoCo v2 / v3 heads differ only in these flags.

    With `last_batch_norm` the output gets a BN without affine parameters (MoCo v3 / SimCLR v2 style).
    `last_bias`: a bias on the final Linear; None: only without `last_batch_norm` (BYOL, Barlow Twins and
    VICReg end in a Linear without bias and no BN).
    """
    if num_layers < 1:
        raise ValueError(f"an MLP head needs num_layers >= 1, got {num_layers}")
    layers: list[nn.Module] = []
    dim = in_dim
    for _ in range(num_layers - 1):
        layers.append(nn.Linear(dim, hidden_dim, bias=not batch_norm))
        if batch_norm:
            layers.append(nn.BatchNorm1d(hidden_dim))
        layers.append(nn.ReLU(inplace=True))
        dim = hidden_dim
    layers.append(nn.Linear(dim, out_dim, bias=not last_batch_norm if last_bias is None else last_bias))
    if last_batch_norm:
        layers.append(nn.BatchNorm1d(out_dim, affine=False))
    return nn.Sequential(*layers)
