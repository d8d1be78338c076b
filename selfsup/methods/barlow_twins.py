"""Barlow Twins (Zbontar et al. 2021, "Self-Supervised Learning via Redundancy Reduction").

Algorithm 1 of the paper: two distorted views -> encoder f -> projector (3 Linear layers of 8192, BN and ReLU
between them) -> embeddings z^A, z^B, each standardised along the batch; their cross-correlation C should be
the identity: L = sum_i (1 - C_ii)^2 + lambda sum_{i != j} C_ij^2 (Eqs. 1-2, `selfsup.losses.barlow_twins_loss`).

The global batch: C is a statistic of the whole batch, so the embeddings of every process are gathered with
gradients (`distributed.gather_with_grad`) and every process computes the same C and loss over N*B rows.
The gather's backward sums the W identical losses' gradients and DDP's mean divides them by W again, so
N processes x B give the gradients of 1 process x N*B. (The official code instead all-reduces C without a
backward, facebookresearch/barlowtwins main.py L215-216 at 8e8d284, so each process back-propagates only its
own rows' share: the gradient is 1/W of the single-process one, which its LARS largely hides.)
BN in the encoder and projector: `sync_bn` unset makes every BN global as soon as several processes train,
as the official code converts the model to SyncBatchNorm (main.py L89).

Views are encoded in separate passes (main.py L208-209), so BN normalises one view's batch at a time.

Gradient accumulation (`train.accumulate_steps`): C and BN statistics come from each micro-batch (batch x
processes rows), not from the printed global batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from selfsup import distributed
from selfsup.batchnorm import make_batchnorm_global
from selfsup.config import ConfigError
from selfsup.heads import mlp
from selfsup.losses import barlow_twins_loss
from selfsup.methods.base import Method, StepOutput


@dataclass
class BarlowTwinsConfig:
    name: str = "barlow_twins"
    proj_hidden_dim: int = 8192  # Sec. 4: three linear layers of 8192, BN + ReLU after the first two
    proj_out_dim: int = 8192
    proj_layers: int = 3
    off_diagonal_weight: float = 5e-3  # lambda (Sec. 4; the official code's default is 0.0051)
    sync_bn: bool | None = None  # global BN (SyncBatchNorm in the official code); None: on with > 1 process

    def __post_init__(self) -> None:
        if self.off_diagonal_weight < 0:
            raise ConfigError(f"method.off_diagonal_weight (lambda) must be >= 0 (paper: 5e-3), got {self.off_diagonal_weight}.")
        if self.proj_layers < 1:
            raise ConfigError(f"method.proj_layers must be >= 1, got {self.proj_layers}.")
        for key in ("proj_hidden_dim", "proj_out_dim"):
            if getattr(self, key) < 1:
                raise ConfigError(f"method.{key} must be a positive width, got {getattr(self, key)}.")


class BarlowTwins(Method):
    views = "byol"  # Sec. 4 / main.py Transform: BYOL's asymmetric views
    Config = BarlowTwinsConfig

    @classmethod
    def optim_defaults(cls, cfg, backbone_name, backbone_kwargs):
        # Sec. 4: LARS, 0.2 x batch / 256 for weights and 0.0048 for biases and BN (0.0048 / 0.2 = 0.024),
        # wd 1.5e-6, 10 warmup epochs
        return {"name": "lars", "lr": 0.2, "bias_lr_scale": 0.024, "weight_decay": 1.5e-6, "warmup_epochs": 10.0}

    def __init__(self, backbone: nn.Module, cfg: BarlowTwinsConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = backbone  # f (exported)
        # Linear layers without bias, the last without BN: the loss standardises z itself
        self.projector = mlp(backbone.embed_dim, cfg.proj_hidden_dim, cfg.proj_out_dim, cfg.proj_layers, last_bias=False)
        if cfg.sync_bn if cfg.sync_bn is not None else distributed.world_size() > 1:
            make_batchnorm_global(self)

    def forward(self, batch) -> StepOutput:
        views, _ = batch
        if len(views) != 2:
            raise ValueError(f"Barlow Twins trains on exactly 2 views per image, got {len(views)}; set data.num_views=2.")
        y1, y2 = views
        z1 = self.projector(self.encoder(y1))  # z^A: [N, D]
        z2 = self.projector(self.encoder(y2))  # z^B: [N, D]
        z1_all = distributed.gather_with_grad(z1)  # [N, D] -> [W*N, D], the global batch
        z2_all = distributed.gather_with_grad(z2)  # [N, D] -> [W*N, D]
        loss = barlow_twins_loss(z1_all, z2_all, self.cfg.off_diagonal_weight)
        return StepOutput(loss, {})
