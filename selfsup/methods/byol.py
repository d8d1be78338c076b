"""BYOL (Grill et al. 2020, "Bootstrap Your Own Latent").

Sec. 3.1 of the paper: an online network (encoder f_theta, projector g_theta, predictor q_theta) predicts
the target network's projection of the other view; the target (f_xi, g_xi) receives no gradient and follows
the online weights, xi <- tau xi + (1 - tau) theta, after every step, with tau rising from tau_base = 0.996
to 1 on a cosine (Sec. 3.2; `selfsup.momentum.cosine_momentum`). The loss is the normalised MSE of Eq. 2,
symmetrised over the two views (Eq. 3: L + L~).

Both views go through the networks in separate passes, so every BN normalises one view's batch, as the
official code applies the network once per view (google-deepmind/deepmind-research byol/byol_experiment.py
L183-184 at f5de0ed). Its BN statistics are cross-replica (configs/byol.py L50-51): `sync_bn` unset turns
every BN global as soon as several processes train (SyncBatchNorm on accelerators, GlobalBatchNorm on CPU
process groups), the target's included, so N processes x B give the loss and gradients of 1 process x N*B.
The loss is a mean over samples, so no gather is needed beyond BN's.

Gradient accumulation (`train.accumulate_steps`): BN statistics come from the micro-batch; the loss is per
sample, so nothing else changes. The target follows once per optimizer step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from selfsup import distributed
from selfsup.batchnorm import make_batchnorm_global
from selfsup.config import ConfigError
from selfsup.heads import mlp
from selfsup.losses import byol_loss
from selfsup.methods.base import Method, StepOutput
from selfsup.momentum import cosine_momentum, momentum_copy, momentum_update


@dataclass
class BYOLConfig:
    name: str = "byol"
    proj_hidden_dim: int = 4096  # g: Linear-BN-ReLU-Linear, 4096 hidden (Sec. 3.3)
    proj_out_dim: int = 256
    pred_hidden_dim: int = 4096  # q: the same MLP shape, 256 -> 4096 -> 256
    momentum: float = 0.996  # tau_base of the cosine schedule to 1 (Sec. 3.2; 1000-epoch preset)
    sync_bn: bool | None = None  # global BN (cross-replica in the official code); None: on with > 1 process

    def __post_init__(self) -> None:
        if not 0.0 <= self.momentum <= 1.0:
            raise ConfigError(f"method.momentum must lie in [0, 1] (BYOL: 0.996), got {self.momentum}.")
        for key in ("proj_hidden_dim", "proj_out_dim", "pred_hidden_dim"):
            if getattr(self, key) < 1:
                raise ConfigError(f"method.{key} must be a positive width, got {getattr(self, key)}.")


class BYOL(Method):
    views = "byol"  # Table 6: asymmetric blur (1.0 / 0.1) and solarisation (0 / 0.2)
    Config = BYOLConfig

    @classmethod
    def optim_defaults(cls, cfg, backbone_name, backbone_kwargs):
        # Sec. 3.3 / configs/byol.py (1000 epochs): LARS, 0.2 x batch / 256, wd 1.5e-6, 10 warmup epochs
        return {"name": "lars", "lr": 0.2, "weight_decay": 1.5e-6, "warmup_epochs": 10.0}

    def __init__(self, backbone: nn.Module, cfg: BYOLConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = backbone  # f_theta (exported)
        # g_theta and q_theta end in a Linear without bias (official networks.py MLP)
        self.projector = mlp(backbone.embed_dim, cfg.proj_hidden_dim, cfg.proj_out_dim, 2, last_bias=False)
        self.predictor = mlp(cfg.proj_out_dim, cfg.pred_hidden_dim, cfg.proj_out_dim, 2, last_bias=False)
        if cfg.sync_bn if cfg.sync_bn is not None else distributed.world_size() > 1:
            make_batchnorm_global(self)  # before the copy: the target's BN is global too
        self.target_encoder = momentum_copy(self.encoder)  # f_xi = f_theta at step 0, never exported
        self.target_projector = momentum_copy(self.projector)  # g_xi

    def online(self, x: Tensor) -> Tensor:
        """q_theta(g_theta(f_theta(x))): [N, C, H, W] -> p: [N, D]."""
        return self.predictor(self.projector(self.encoder(x)))

    @torch.no_grad()
    def target(self, x: Tensor) -> Tensor:
        """sg(g_xi(f_xi(x))): [N, C, H, W] -> z': [N, D], no gradient."""
        return self.target_projector(self.target_encoder(x))

    def forward(self, batch) -> StepOutput:
        views, _ = batch
        if len(views) != 2:
            raise ValueError(f"BYOL trains on exactly 2 views per image, got {len(views)}; set data.num_views=2.")
        x1, x2 = views
        p1, p2 = self.online(x1), self.online(x2)  # [N, D] each
        z1, z2 = self.target(x1), self.target(x2)  # [N, D] each
        # Eq. 3: each view's prediction regresses the other view's target projection
        loss = byol_loss(p1, z2) + byol_loss(p2, z1)
        return StepOutput(loss, {})

    def momentum_at(self, progress: float) -> float:
        return cosine_momentum(progress, self.cfg.momentum)

    def after_step(self, progress: float) -> None:
        # xi <- tau xi + (1 - tau) theta; BN running statistics follow the same average (selfsup.momentum)
        momentum_update([self.encoder, self.projector], [self.target_encoder, self.target_projector],
                        self.momentum_at(progress), buffers="average")

    def backbone_passes(self, views: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        return list(views), list(views)  # both views through the online (backward) and target (no grad) nets
