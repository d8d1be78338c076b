"""VICReg (Bardes, Ponce, LeCun 2022, "Variance-Invariance-Covariance Regularization").

Sec. 3 of the paper: two views -> encoder f -> expander h (3 Linear layers of 8192, BN + ReLU between them)
-> embeddings Z, Z'. The loss (Eq. 6, `selfsup.losses.vicreg_loss`) weighs invariance s(Z, Z') (mean squared
distance), variance v (a hinge keeping the standard deviation of every dimension over the batch at 1) and
covariance c (squared off-diagonal covariances), with lambda = mu = 25 and nu = 1 (Sec. 4.1).

The global batch: v and c are statistics of the whole batch, so the embeddings of every process are gathered
with gradients (`distributed.gather_with_grad`) and every process computes the same three terms over N*B rows
(the official code gathers too, with a gather whose backward sums, facebookresearch/vicreg main_vicreg.py
L199-201 and L307-323 at 4e12602). The gather's backward sums the W identical losses' gradients and DDP's mean
divides by W, so N processes x B give the gradients of 1 process x N*B. BN: `sync_bn` unset makes every BN
global as soon as several processes train (the official code converts to SyncBatchNorm, main_vicreg.py L107).

Views are encoded in separate passes (main_vicreg.py L195-196).

Gradient accumulation (`train.accumulate_steps`): variance, covariance and BN statistics come from each
micro-batch (batch x processes rows), not from the printed global batch.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from selfsup import distributed
from selfsup.batchnorm import make_batchnorm_global
from selfsup.config import ConfigError
from selfsup.heads import mlp
from selfsup.losses import vicreg_terms
from selfsup.methods.base import Method, StepOutput


@dataclass
class VICRegConfig:
    name: str = "vicreg"
    proj_hidden_dim: int = 8192  # expander 8192-8192-8192 (Sec. 4.1, main_vicreg.py --mlp)
    proj_out_dim: int = 8192
    proj_layers: int = 3
    invariance_weight: float = 25.0  # lambda
    variance_weight: float = 25.0  # mu
    covariance_weight: float = 1.0  # nu
    sync_bn: bool | None = None  # global BN (SyncBatchNorm in the official code); None: on with > 1 process

    def __post_init__(self) -> None:
        for key in ("invariance_weight", "variance_weight", "covariance_weight"):
            if getattr(self, key) < 0:
                raise ConfigError(f"method.{key} must be >= 0 (paper: 25 / 25 / 1), got {getattr(self, key)}.")
        if self.proj_layers < 1:
            raise ConfigError(f"method.proj_layers must be >= 1, got {self.proj_layers}.")
        for key in ("proj_hidden_dim", "proj_out_dim"):
            if getattr(self, key) < 1:
                raise ConfigError(f"method.{key} must be a positive width, got {getattr(self, key)}.")


class VICReg(Method):
    views = "byol"  # Sec. 4.1 / augmentations.py: BYOL's asymmetric views
    Config = VICRegConfig

    @classmethod
    def optim_defaults(cls, cfg, backbone_name, backbone_kwargs):
        # Sec. 4.1 / main_vicreg.py: LARS, 0.2 x batch / 256, wd 1e-6, 10 warmup epochs
        return {"name": "lars", "lr": 0.2, "weight_decay": 1e-6, "warmup_epochs": 10.0}

    def __init__(self, backbone: nn.Module, cfg: VICRegConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = backbone  # f (exported)
        # h: the last Linear without bias and without BN (main_vicreg.py Projector)
        self.projector = mlp(backbone.embed_dim, cfg.proj_hidden_dim, cfg.proj_out_dim, cfg.proj_layers, last_bias=False)
        if cfg.sync_bn if cfg.sync_bn is not None else distributed.world_size() > 1:
            make_batchnorm_global(self)

    def forward(self, batch) -> StepOutput:
        views, _ = batch
        if len(views) != 2:
            raise ValueError(f"VICReg trains on exactly 2 views per image, got {len(views)}; set data.num_views=2.")
        x1, x2 = views
        z1 = self.projector(self.encoder(x1))  # Z: [N, D]
        z2 = self.projector(self.encoder(x2))  # Z': [N, D]
        z1_all = distributed.gather_with_grad(z1)  # [N, D] -> [W*N, D], the global batch
        z2_all = distributed.gather_with_grad(z2)  # [N, D] -> [W*N, D]
        invariance, variance, covariance = vicreg_terms(z1_all, z2_all)
        cfg = self.cfg
        loss = cfg.invariance_weight * invariance + cfg.variance_weight * variance + cfg.covariance_weight * covariance
        metrics = {"invariance": invariance.detach(), "variance": variance.detach(), "covariance": covariance.detach()}
        return StepOutput(loss, metrics)
