"""SimCLR (Chen et al. 2020, "A Simple Framework for Contrastive Learning of Visual Representations").

Algorithm 1 of the paper: two augmented views of each image -> encoder f -> projection g ->
NT-Xent over the 2N views, where each view's positive is the other view of its image and the
other 2N - 2 views are negatives. Across processes the views of every process are negatives too
(gathered with gradients, so N processes x B equals one process x N*B).

Global BN (Sec. 2.2): BN mean and variance come from all devices, or a view and its positive, normalised
with the same few samples' statistics, leak a shortcut. `sync_bn` unset turns every BN global as soon as
several processes train: torch's SyncBatchNorm on accelerators, and on CPU process groups (gloo, where
SyncBatchNorm has no kernel) `selfsup.batchnorm.GlobalBatchNorm`, which shares the statistics through a
gather with gradients; on one process BN already sees the whole batch and nothing is needed.

One backbone pass over all views: `forward` concatenates the V views ([V*N, C, H, W]) before f and g, so
every BN (backbone and projector) normalises with statistics of all 2N views of the batch, as the paper's
global BN computes them and as google-research/simclr does (tf2/model.py at be265c2, `Model.__call__`:
`tf.concat(features_list, 0)` then one `resnet_model` call). One pass per view, as lightly's example does
(lightly-ai/lightly examples/pytorch/simclr.py at 2abf921: `z0 = model(x0)`, `z1 = model(x1)`), would give
each view BN statistics of its own N images; `bn_per_view: true` does that (docs/compare_lightly.md measures
both). tests/test_simclr.py checks a step against a plain-PyTorch
reference of the concatenated form.

Gradient accumulation (`train.accumulate_steps`): the engine scales the lr by batch x processes x
accumulation, but NT-Xent is computed per micro-batch, so each view has 2 x batch x processes - 2
negatives, not the printed global batch's, and BN statistics come from the micro-batch too. It adds
no negatives; it only averages the gradients of several smaller contrastive problems.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from selfsup import distributed
from selfsup.batchnorm import convert_global_batchnorm
from selfsup.heads import mlp
from selfsup.losses import nt_xent
from selfsup.methods.base import Method, StepOutput


@dataclass
class SimCLRConfig:
    name: str = "simclr"
    # tau: on purpose between the paper's 0.1 (ImageNet, batch 4096) and 0.5 (CIFAR-10), for the smaller
    # batches of 28-96 px runs (docs/recipes.md)
    temperature: float = 0.2
    proj_hidden_dim: int = 2048
    proj_out_dim: int = 128
    proj_layers: int = 2
    proj_batch_norm: bool = True  # BN in the projection MLP (SimCLR v2 / solo-learn); False: paper v1
    # BN (gamma, beta) on the projection output, no bias before it: google-research/simclr tf2/model.py L180-186
    # (BN with gamma only there) and lightly's SimCLRProjectionHead. Without it, 1 epoch of lightly's recipe gave
    # kNN 69.5 % (3 seeds) against 72.4 % with it and 71.8 % for lightly (docs/compare_lightly.md)
    proj_last_batch_norm: bool = True
    sync_bn: bool | None = None  # global BN (SyncBatchNorm; GlobalBatchNorm on CPU processes); None: on with > 1 process
    # one f + g pass per view (BN statistics over each view's N images, as lightly's example); False: one pass over
    # all V*N views, BN over all of them (google-research/simclr tf2/model.py L259-262)
    bn_per_view: bool = False


class SimCLR(Method):
    views = "simclr"
    Config = SimCLRConfig

    @classmethod
    def optim_defaults(cls, cfg, backbone_name, backbone_kwargs):
        return {"name": "lars", "lr": 0.3, "weight_decay": 1e-6}  # SimCLR Sec. B.6: LARS, 0.3 x batch/256

    def __init__(self, backbone: nn.Module, cfg: SimCLRConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = backbone  # f(.)
        self.projector = mlp(  # g(.)
            backbone.embed_dim,
            cfg.proj_hidden_dim,
            cfg.proj_out_dim,
            cfg.proj_layers,
            batch_norm=cfg.proj_batch_norm,
            last_batch_norm=cfg.proj_last_batch_norm,
            last_affine=True,
        )
        backend = dist.get_backend() if distributed.is_distributed() else None
        if use_sync_bn(cfg.sync_bn, distributed.world_size()):
            if backend in (None, "gloo"):  # CPU processes: SyncBatchNorm has no CPU kernel
                convert_global_batchnorm(self)
            else:
                nn.SyncBatchNorm.convert_sync_batchnorm(self)  # swaps BN children in place; self is no BN

    def forward(self, batch) -> StepOutput:
        views, _ = batch
        if len(views) < 2:
            raise ValueError(f"SimCLR needs at least 2 views per image, got {len(views)}; set data.num_views >= 2.")
        n = views[0].shape[0]
        if self.cfg.bn_per_view:  # one pass per view, BN over its N images: V x [N, C, H, W] -> z: [V, N, D]
            z = torch.stack([self.projector(self.encoder(x)) for x in views])
        else:  # all views through f and g in one pass (BN over all V*N views): [V*N, C, H, W] -> z: [V*N, D]
            z = self.projector(self.encoder(torch.cat(views)))
            z = z.view(len(views), n, -1)  # [V, N, D]
        # every (i, j) pair of views is a positive pair (the paper's 2 views; multi-crop averages)
        losses = []
        offset = distributed.rank() * n
        gathered = [distributed.gather_with_grad(z[v]) for v in range(len(views))]  # V x [W*N, D]
        for i in range(len(views)):
            for j in range(i + 1, len(views)):
                losses.append(
                    nt_xent(z[i], z[j], self.cfg.temperature, z1_all=gathered[i], z2_all=gathered[j], offset=offset)
                )
        loss = torch.stack(losses).mean()
        return StepOutput(loss, {})


def use_sync_bn(sync_bn: bool | None, world_size: int) -> bool:
    """The config's choice, or by default global BN whenever several processes train (Sec. 2.2)."""
    if sync_bn is not None:
        return sync_bn
    return world_size > 1
