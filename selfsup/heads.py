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
    last_affine: bool = False,
) -> nn.Sequential:
    """Linear-(BN)-ReLU blocks then a final Linear; SimCLR / MoCo v2 / v3 heads differ only in these flags.

    With `last_batch_norm` the output gets a BN (MoCo v3 style: without affine parameters; `last_affine`: with
    them, as google-research/simclr's and lightly's SimCLR heads) and the final Linear no bias.
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
    layers.append(nn.Linear(dim, out_dim, bias=not last_batch_norm))
    if last_batch_norm:
        layers.append(nn.BatchNorm1d(out_dim, affine=last_affine))
    return nn.Sequential(*layers)
