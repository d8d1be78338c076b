"""Projection and prediction MLPs shared by the contrastive methods, and DINO's prototype head."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import Tensor, nn


def mlp(
    in_dim: int,
    hidden_dim: int,
    out_dim: int,
    num_layers: int = 2,
    *,
    batch_norm: bool = True,
    last_batch_norm: bool = False,
    last_bias: bool | None = None,
    last_affine: bool = False,
) -> nn.Sequential:
    """Linear-(BN)-ReLU blocks then a final Linear; SimCLR / MoCo v2 / v3 heads differ only in these flags.

    With `last_batch_norm` the output gets a BN (MoCo v3 / SimCLR v2 style: without affine parameters;
    `last_affine`: with them, as google-research/simclr's and lightly's SimCLR heads).
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
        layers.append(nn.BatchNorm1d(out_dim, affine=last_affine))
    return nn.Sequential(*layers)


class DINOHead(nn.Module):
    """DINO's projection head (Caron et al. 2021, Sec. 3.1 and App.; facebookresearch/dino vision_transformer.py
    DINOHead): an MLP of `num_layers` (Linear-GELU, optional BN) to a `bottleneck_dim` bottleneck, L2 normalisation,
    and a weight-normalised Linear without bias onto K prototypes, w_k = g_k v_k / ||v_k||.

    With `norm_last_layer` g stays 1 (not trained), so the logits are cosines between the bottleneck and the
    prototypes. Written by hand (the weight norm as two plain parameters, the names of torch's old `weight_norm`)
    so a frozen last layer is a flag of `forward`, not a parametrisation to undo.
    """

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 num_layers: int = 3, *, batch_norm: bool = False, norm_last_layer: bool = True,
                 patch_out_dim: int | None = None) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"the DINO head needs num_layers >= 1, got {num_layers}")
        layers: list[nn.Module] = []
        dim = in_dim
        for _ in range(num_layers - 1):
            layers += [nn.Linear(dim, hidden_dim), *([nn.BatchNorm1d(hidden_dim)] if batch_norm else []), nn.GELU()]
            dim = hidden_dim
        layers.append(nn.Linear(dim, bottleneck_dim))
        self.mlp = nn.Sequential(*layers)
        for module in self.mlp.modules():  # the official init: trunc normal 0.02, zero biases
            if isinstance(module, nn.Linear):
                trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        # v keeps nn.Linear's default init, as the official head wraps a fresh Linear after its init pass
        self.weight_v = nn.Parameter(nn.Linear(bottleneck_dim, out_dim, bias=False).weight.detach().clone())  # [K, b]
        self.weight_g = nn.Parameter(torch.ones(out_dim, 1), requires_grad=not norm_last_layer)  # [K, 1]
        self.patch_weight_v = self.patch_weight_g = None
        if patch_out_dim is not None:  # iBOT's unshared head: the same MLP, its own prototypes for patch tokens
            self.patch_weight_v = nn.Parameter(nn.Linear(bottleneck_dim, patch_out_dim, bias=False).weight.detach().clone())
            self.patch_weight_g = nn.Parameter(torch.ones(patch_out_dim, 1), requires_grad=not norm_last_layer)

    def forward(self, x: Tensor, freeze_last_layer: bool = False, patch: bool = False) -> Tensor:
        """x: [N, in_dim] -> logits [N, K]. `freeze_last_layer`: the prototypes get a zero gradient. `patch`: the
        patch prototypes, where the head has its own (iBOT, unshared)."""
        z = F.normalize(self.mlp(x), dim=-1)  # [N, b]
        v, g = self.weight_v, self.weight_g
        if patch and self.patch_weight_v is not None:
            v, g = self.patch_weight_v, self.patch_weight_g
        if freeze_last_layer:  # zero (not None) gradients: every process still reduces the same parameters
            v, g = v.detach() + 0.0 * v, g.detach() + 0.0 * g
        weight = g * v / v.norm(dim=1, keepdim=True)  # [K, b]
        return z @ weight.T  # [N, K]
