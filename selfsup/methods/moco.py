"""MoCo v2 (He et al. 2020; Chen et al. 2020, "Improved Baselines") and v3 (Chen, Xie, He 2021).

Both: a query encoder f_q (backbone + MLP projector g_q) trained by gradient, and a key encoder
f_k / g_k of the same architecture that only follows it, `theta_k <- m theta_k + (1 - m) theta_q`
after every optimizer step (`selfsup.momentum`), never receiving gradients.
- v2 (`method.variant: v2`, Alg. 1 of MoCo): each query's positive is the key of its other view,
  its negatives are a queue of K keys from earlier steps; after the loss the keys of *all*
  processes are enqueued, so the queue is identical on every rank. Optionally symmetrised.
- v3 (`method.variant: v3`, Alg. 1 of MoCo v3): no queue; a prediction MLP on the query branch,
  the keys of the whole global batch as negatives, a symmetric loss scaled by 2 tau, and m
  following a cosine schedule to 1. For ViTs the patch embedding stays at its random init
  ("random patch projection", Sec. 4.2), which steadies training, and the ViT is initialised as the
  official VisionTransformerMoCo (`method.vit_init: moco_v3`, `init_vit_moco_v3`): fixed 2-D sin-cos
  positions, xavier-uniform with q, k, v as three matrices, a xavier-uniform patch projection, cls N(0, 1e-6).

BatchNorm and the positive pair: with per-process BN, a query and its key are normalised with
statistics of the same few samples, a signal the model can exploit to find its positive among the
queue's keys, which were normalised in other batches (MoCo Sec. 3.3). `method.bn_mode` picks the remedy
(the method prints which one runs, and `self.cfg.bn_mode` holds it):
- `shuffle`: shuffle-BN. The key encoder's input batch is shuffled across processes and its outputs
  unshuffled (`distributed.shuffle_batch`), so a query and its key see BN statistics of different
  subsets. At world size 1 there is only one subset and it does nothing.
- `split`: split BN (ghost BN), the one-process substitute of the MoCo authors' CIFAR demo
  (facebookresearch/moco colab/moco_cifar10_demo.ipynb, `SplitBatchNorm`, `--bn-splits 8`): every BN of
  both encoders and projectors normalises each of `method.bn_splits` chunks of its batch with its own
  statistics, as `bn_splits` processes would, and the key batch is shuffled within the process before
  the key encoder (`selfsup.batchnorm`). Per process, on any number of processes. The exported encoder
  keeps plain-BN state-dict keys (SplitBatchNorm keeps BatchNorm's names; in eval mode it is plain BN
  on the running statistics, the mean of the chunks'), so timm loads it unchanged.
- `sync`: every BN becomes SyncBatchNorm (statistics over the global batch, as the MoCo v3 code does);
  no shuffling. torch supports SyncBN on GPUs only; at world size 1 it acts as plain BN.
- `none`: plain per-process BN, no remedy.
- `auto` (default): `shuffle` on several processes; on one process `split` for v2 (queue negatives come
  from other batches, so whole-batch BN leaks) and `none` for v3 (its negatives are the keys of the same
  batch, so one-process BN over the whole batch is exactly the official code's SyncBN).
The older switches still work: `sync_bn: true` means `bn_mode: sync`, `shuffle_bn: false` means `none`.

Gradient accumulation (`train.accumulate_steps`): the engine scales the lr by batch x processes x
accumulation, but each micro-batch is one forward. v2: the queue's K negatives are unaffected, but the
keys of every micro-batch are enqueued as it runs (K must be a multiple of batch x processes, not of the
accumulated batch), and BN statistics come from the micro-batch. v3: the negatives are the keys of the
micro-batch (batch x processes), fewer than the printed global batch, and so are the BN statistics.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfsup import distributed
from selfsup.backbones import is_patch_model
from selfsup.batchnorm import convert_split_batchnorm, shuffle_rows, unshuffle_rows
from selfsup.config import ConfigError
from selfsup.heads import mlp
from selfsup.losses import info_nce
from selfsup.methods.base import Method, StepOutput
from selfsup.momentum import cosine_momentum, momentum_copy, momentum_update

BN_MODES = ("auto", "shuffle", "split", "sync", "none")
QUEUE_SEED = 0  # the initial random queue is drawn from a fixed generator: the same on every rank, no broadcast


@dataclass
class MoCoConfig:
    name: str = "moco"
    variant: str = "v2"  # v2: queue of negatives | v3: global-batch negatives + predictor
    # tau; None: 0.2 (v2, README's --moco-t 0.2; v3 ViT, CONFIG.md) or 1.0 (v3 ResNet, main_moco.py --moco-t)
    temperature: float | None = None
    # m, or m0 of the cosine schedule; None: 0.999 (v2, main_moco.py --moco-m) or 0.99 (v3, moco-v3 --moco-m)
    momentum: float | None = None
    momentum_schedule: str | None = None  # constant | cosine (m0 -> 1); None: v2 constant, v3 cosine
    # K (v2 only), a multiple of the global batch. The paper's 65536 on purpose not: more keys than small datasets
    # hold (Fashion-MNIST: 60 000), so the queue would repeat images from over an epoch ago
    queue_size: int = 4096
    symmetric: bool | None = None  # v2: symmetrised loss ("MoCo v2+"); None: v2 false, v3 true (always)
    # BN remedy for the positive pair: auto | shuffle | split | sync | none (module docstring). auto: shuffle-BN on
    # several processes; on one, split BN for v2 (the official CIFAR demo's) and whole-batch BN for v3
    bn_mode: str = "auto"
    bn_splits: int = 8  # split BN: chunks per batch, each normalised alone (the demo's --bn-splits, "8 GPUs")
    shuffle_bn: bool = True  # older switch: false = bn_mode none
    sync_bn: bool = False  # older switch: true = bn_mode sync (GPU only; MoCo v3's code always syncs)
    proj_hidden_dim: int | None = None  # None: 2048 (v2: ResNet-50's width) or 4096 (v3, --moco-mlp-dim)
    proj_out_dim: int | None = None  # None: 128 (v2, --moco-dim) or 256 (v3, --moco-dim)
    proj_layers: int | None = None  # None: 2 (v2; v3 ResNet), 3 (v3 ViT)
    proj_batch_norm: bool | None = None  # BN after hidden layers; None: v2 false (paper's MLP), v3 true
    proj_last_batch_norm: bool | None = None  # BN (no affine) on the output; None: v2 false, v3 true
    pred_hidden_dim: int = 4096  # v3 predictor: 2 layers, proj_out_dim -> pred_hidden_dim -> proj_out_dim
    pred_last_batch_norm: bool | None = None  # v3 predictor's output BN (no affine); None: v3 ViT true, ResNet false
    random_patch_projection: bool | None = None  # freeze the ViT patch embedding; None: true for v3 ViTs
    vit_init: str | None = None  # moco_v3 (moco-v3 vits.py) | timm (timm's ViT init); None: moco_v3 for v3 ViTs

    def __post_init__(self) -> None:
        if self.variant not in ("v2", "v3"):
            raise ConfigError(f"method.variant must be v2 or v3, got {self.variant!r}.")
        if self.temperature is not None and self.temperature <= 0:
            raise ConfigError(f"method.temperature must be > 0, got {self.temperature}.")
        if self.momentum is not None and not 0.0 <= self.momentum <= 1.0:
            raise ConfigError(f"method.momentum must lie in [0, 1] (typically 0.99-0.999), got {self.momentum}.")
        if self.momentum_schedule not in (None, "constant", "cosine"):
            raise ConfigError(f"method.momentum_schedule must be constant or cosine, got {self.momentum_schedule!r}.")
        if self.queue_size < 1:
            raise ConfigError(f"method.queue_size must be positive, got {self.queue_size}.")
        if self.bn_mode not in BN_MODES:
            raise ConfigError(f"method.bn_mode must be one of {', '.join(BN_MODES)}, got {self.bn_mode!r}.")
        if self.bn_splits < 1:
            raise ConfigError(f"method.bn_splits must be >= 1 (1: plain BN), got {self.bn_splits}.")
        if self.sync_bn and self.bn_mode not in ("auto", "sync"):
            raise ConfigError(f"method.sync_bn=true (the older spelling of bn_mode=sync) contradicts "
                              f"method.bn_mode={self.bn_mode}; drop method.sync_bn.")
        if not self.shuffle_bn and self.bn_mode not in ("auto", "none"):
            raise ConfigError(f"method.shuffle_bn=false (the older spelling of bn_mode=none) contradicts "
                              f"method.bn_mode={self.bn_mode}; drop method.shuffle_bn.")
        if self.vit_init not in (None, "moco_v3", "timm"):
            raise ConfigError(f"method.vit_init must be moco_v3 or timm, got {self.vit_init!r}.")
        if self.variant == "v3" and self.symmetric is False:
            raise ConfigError("MoCo v3's loss is symmetric by definition; drop method.symmetric=false or use variant v2.")


def _resolve(cfg: MoCoConfig, backbone: nn.Module) -> MoCoConfig:
    """Fill the variant-dependent defaults (None) so `self.cfg` states what actually runs."""
    v3 = cfg.variant == "v3"
    vit = getattr(backbone, "patch_embed", None) is not None

    def pick(value, default):
        return default if value is None else value

    # facebookresearch/moco main_moco.py (v2) and facebookresearch/moco-v3 main_moco.py, moco/builder.py (v3);
    # docs/recipes.md lists each with its line.
    return dataclasses.replace(
        cfg,
        temperature=pick(cfg.temperature, 1.0 if v3 and not vit else 0.2),
        momentum=pick(cfg.momentum, 0.99 if v3 else 0.999),
        momentum_schedule=pick(cfg.momentum_schedule, "cosine" if v3 else "constant"),
        symmetric=pick(cfg.symmetric, v3),
        proj_layers=pick(cfg.proj_layers, 3 if v3 and vit else 2),
        proj_batch_norm=pick(cfg.proj_batch_norm, v3),
        proj_hidden_dim=pick(cfg.proj_hidden_dim, 4096 if v3 else 2048),
        proj_out_dim=pick(cfg.proj_out_dim, 256 if v3 else 128),
        proj_last_batch_norm=pick(cfg.proj_last_batch_norm, v3),
        pred_last_batch_norm=pick(cfg.pred_last_batch_norm, v3 and vit),  # builder.py: ViT predictor keeps last_bn
        random_patch_projection=pick(cfg.random_patch_projection, v3 and vit),
        vit_init=pick(cfg.vit_init, "moco_v3" if v3 and vit else "timm"),
    )


def resolve_bn_mode(cfg: MoCoConfig, world_size: int) -> str:
    """The BN remedy that runs: the config's, or for `auto` shuffle-BN on several processes and, on one,
    split BN for v2 and whole-batch BN for v3 (module docstring). The older switches map onto it."""
    if cfg.sync_bn:
        return "sync"
    if not cfg.shuffle_bn and cfg.bn_mode == "auto":
        return "none"
    if cfg.bn_mode != "auto":
        return cfg.bn_mode
    if world_size > 1:
        return "shuffle"
    return "none" if cfg.variant == "v3" else "split"


def describe_bn_mode(cfg: MoCoConfig, world_size: int) -> str:
    """One line for the start of a run: which BN remedy runs and what each BN's statistics cover."""
    mode = cfg.bn_mode
    if mode == "split":
        return (f"split BN: every BN normalises {cfg.bn_splits} chunks of its per-process batch separately, "
                f"keys shuffled across them (facebookresearch/moco CIFAR demo)")
    if mode == "shuffle":
        return f"shuffle BN: the key batch shuffled across {world_size} processes"
    if mode == "sync":
        return f"sync BN: statistics over the global batch of {world_size} process(es)"
    return "plain BN over each process's batch" + (" (= MoCo v3's SyncBN on one process)" if world_size == 1 else "")


def freeze_patch_embedding(backbone: nn.Module) -> None:
    """Random patch projection (MoCo v3 Sec. 4.2): the patch embedding keeps its random init.

    requires_grad=False, so the optimizer (built from trainable parameters) leaves it out.
    """
    patch_embed = getattr(backbone, "patch_embed", None)
    if patch_embed is None:
        raise ConfigError(
            f"method.random_patch_projection needs a ViT backbone (one with a patch_embed); "
            f"{getattr(backbone, 'backbone_name', type(backbone).__name__)!r} has none. Set it to false."
        )
    patch_embed.requires_grad_(False)


def sincos_pos_embed_moco_v3(grid_h: int, grid_w: int, dim: int, temperature: float = 10000.0) -> Tensor:
    """MoCo v3's fixed 2-D sin-cos table [h*w, D] in patch order (row-major): the patch at row r, column c gets
    [sin(r w), cos(r w), sin(c w), cos(c w)] with w_k = temperature^(-k / (D/4)), k < D/4 (vits.py L53-64).
    Written here: timm's `build_sincos2d_pos_embed` orders the channels [sin r, sin c, cos r, cos c]. On a
    non-square grid the official meshgrid pairs the flattened (w, h) grid with row-major tokens; here each token
    gets its own row and column (the same table on square grids).
    """
    if dim % 4:
        raise ConfigError(f"MoCo v3's 2-D sin-cos position embedding needs an embedding size divisible by 4, got {dim}; "
                          "set method.vit_init=timm or change backbone.kwargs.embed_dim.")
    omega = temperature ** -(torch.arange(dim // 4, dtype=torch.float32) / (dim // 4))  # [D/4]
    rows = torch.arange(grid_h, dtype=torch.float32).repeat_interleave(grid_w)  # [h*w]: r of each token
    cols = torch.arange(grid_w, dtype=torch.float32).repeat(grid_h)  # [h*w]: c of each token
    r, c = rows[:, None] * omega, cols[:, None] * omega  # [h*w, D/4] each
    return torch.cat([r.sin(), r.cos(), c.sin(), c.cos()], dim=1)  # [h*w, D]


@torch.no_grad()
def init_vit_moco_v3(vit: nn.Module) -> None:
    """The ViT's initialisation in the MoCo v3 code (facebookresearch/moco-v3 vits.py L26-69, VisionTransformerMoCo):
    fixed 2-D sin-cos position embedding (zeros for the class token, not trained); every Linear xavier-uniform
    with zero bias, the qkv Linear as three [D, D] matrices (bound sqrt(6 / (D + D)), not that of [3D, D]); the
    patch projection uniform with the bound of a Linear C*p*p -> D (the code writes 3 * p * p: RGB), zero bias;
    the class token N(0, 1e-6). LayerNorms keep timm's 1 / 0, as there.
    """
    patch_embed = getattr(vit, "patch_embed", None)
    if patch_embed is None or getattr(vit, "pos_embed", None) is None:
        raise ConfigError(f"method.vit_init=moco_v3 needs a ViT with a position embedding; "
                          f"{getattr(vit, 'backbone_name', type(vit).__name__)!r} is not one. Set method.vit_init=timm.")
    grid_h, grid_w = patch_embed.grid_size
    prefix = 0 if vit.no_embed_class else vit.num_prefix_tokens
    table = sincos_pos_embed_moco_v3(grid_h, grid_w, vit.embed_dim)  # [h*w, D]
    vit.pos_embed.copy_(torch.cat([table.new_zeros(prefix, vit.embed_dim), table]).unsqueeze(0))  # [1, P + h*w, D]
    vit.pos_embed.requires_grad_(False)
    for name, module in vit.named_modules():
        if isinstance(module, nn.Linear):
            if "qkv" in name:  # weight [3D, D]: q, k and v each a D x D matrix
                bound = math.sqrt(6.0 / (module.weight.shape[0] // 3 + module.weight.shape[1]))
                nn.init.uniform_(module.weight, -bound, bound)
            else:
                nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    if getattr(vit, "cls_token", None) is not None:
        nn.init.normal_(vit.cls_token, std=1e-6)
    proj = patch_embed.proj  # Conv2d [D, C, p, p], a Linear C*p*p -> D
    bound = math.sqrt(6.0 / (proj.weight[0].numel() + proj.weight.shape[0]))
    nn.init.uniform_(proj.weight, -bound, bound)
    if proj.bias is not None:
        nn.init.zeros_(proj.bias)


class MoCo(Method):
    views = "moco_v2"  # the instance sets moco_v3 for variant v3
    Config = MoCoConfig

    def __init__(self, backbone: nn.Module, cfg: MoCoConfig):
        super().__init__()
        world_size = distributed.world_size()
        cfg = _resolve(cfg, backbone)
        cfg = dataclasses.replace(cfg, bn_mode=resolve_bn_mode(cfg, world_size))
        self.cfg = cfg
        self.v3 = cfg.variant == "v3"
        self.views = "moco_v3" if self.v3 else "moco_v2"
        if cfg.vit_init == "moco_v3":
            init_vit_moco_v3(backbone)
        if cfg.random_patch_projection:  # after the init: the projection stays at those values
            freeze_patch_embedding(backbone)

        self.encoder = backbone  # f_q (exported)
        self.projector = mlp(  # g_q
            backbone.embed_dim, cfg.proj_hidden_dim, cfg.proj_out_dim, cfg.proj_layers,
            batch_norm=cfg.proj_batch_norm, last_batch_norm=cfg.proj_last_batch_norm,
        )
        # v3's prediction head q = h(g_q(f_q(x))): BN in the hidden layer; on the output only for ViTs
        self.predictor = mlp(
            cfg.proj_out_dim, cfg.pred_hidden_dim, cfg.proj_out_dim, 2, last_batch_norm=cfg.pred_last_batch_norm,
        ) if self.v3 else None
        if cfg.bn_mode == "sync":
            nn.SyncBatchNorm.convert_sync_batchnorm(self)  # swaps BN children in place; self is no BN
        elif cfg.bn_mode == "split":  # both encoders and projectors, as the demo builds both with SplitBatchNorm
            convert_split_batchnorm(self, cfg.bn_splits)  # in place; state-dict keys unchanged
        distributed.print_once(f"[selfsup] moco {cfg.variant}: bn_mode={cfg.bn_mode}, {describe_bn_mode(cfg, world_size)}")
        self.momentum_encoder = momentum_copy(self.encoder)  # f_k = f_q at step 0, never exported
        self.momentum_projector = momentum_copy(self.projector)  # g_k

        if not self.v3:
            g = torch.Generator().manual_seed(QUEUE_SEED)
            queue = F.normalize(torch.randn(cfg.queue_size, cfg.proj_out_dim, generator=g), dim=1)  # [K, D]
            self.register_buffer("queue", queue)  # saved in checkpoints with the model
            self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))  # next row to overwrite
            # Kept equal on every rank by construction (all keys enqueued everywhere); DDP need not
            # re-broadcast K x C floats from rank 0 at each forward.
            self._ddp_params_and_buffers_to_ignore = ["queue", "queue_ptr"]

    @classmethod
    def optim_defaults(cls, cfg: MoCoConfig, backbone_name: str, backbone_kwargs: dict) -> dict:
        """v2: SGD 0.03 per 256, wd 1e-4, cosine without warmup (MoCo v2). v3: AdamW 1.5e-4, wd 0.1, 40 warmup
        epochs for ViTs (CONFIG.md); LARS 0.6, wd 1e-6, 10 warmup epochs for ResNets (main_moco.py defaults)."""
        if cfg.variant == "v2":
            return {"name": "sgd", "lr": 0.03, "weight_decay": 1e-4, "momentum": 0.9, "warmup_epochs": 0.0}
        if is_patch_model(backbone_name, **backbone_kwargs):
            return {"name": "adamw", "lr": 1.5e-4, "weight_decay": 0.1, "betas": (0.9, 0.999), "warmup_epochs": 40.0}
        return {"name": "lars", "lr": 0.6, "weight_decay": 1e-6, "warmup_epochs": 10.0}

    # -- the two branches -------------------------------------------------------------------------

    def query(self, x: Tensor) -> Tensor:
        """q = g_q(f_q(x)) (v3: h(g_q(f_q(x)))); `info_nce` L2-normalises it. x: [N, C, H, W] -> [N, D]."""
        z = self.projector(self.encoder(x))
        return self.predictor(z) if self.predictor is not None else z

    @torch.no_grad()
    def keys(self, x: Tensor) -> Tensor:
        """k = normalize(g_k(f_k(x))), the key batch shuffled for BN (across processes, or across the
        chunks of split BN). [N, C, H, W] -> [N, D]."""
        if self.cfg.bn_mode == "split":
            x, local_permutation = shuffle_rows(x)  # key i lands in a random chunk
            k = self.momentum_projector(self.momentum_encoder(x))  # [N, D], rows in shuffled order
            k = unshuffle_rows(k, local_permutation)  # [N, D], rows back in input order
        else:
            permutation = None
            if self.cfg.bn_mode == "shuffle":
                x, permutation = distributed.shuffle_batch(x)
            k = self.momentum_projector(self.momentum_encoder(x))  # [N, D], rows in shuffled order
            k = distributed.unshuffle_batch(k, permutation)  # [N, D], rows back in local order
        return F.normalize(k.to(torch.promote_types(k.dtype, torch.float32)), dim=1)

    # -- training step ----------------------------------------------------------------------------

    def forward(self, batch) -> StepOutput:
        views, _ = batch
        if len(views) != 2:
            raise ValueError(f"MoCo trains on exactly 2 views per image, got {len(views)}; set data.num_views=2.")
        x1, x2 = views
        if self.cfg.bn_mode == "split" and x1.shape[0] % self.cfg.bn_splits:
            raise ConfigError(
                f"method.bn_mode=split needs a per-process batch divisible by method.bn_splits={self.cfg.bn_splits}, "
                f"got data.batch_size {x1.shape[0]}; set data.batch_size to a multiple of {self.cfg.bn_splits} "
                f"or method.bn_splits to a divisor of {x1.shape[0]}."
            )
        loss = self._forward_v3(x1, x2) if self.v3 else self._forward_v2(x1, x2)
        return StepOutput(loss, {})

    def _forward_v2(self, x1: Tensor, x2: Tensor) -> Tensor:
        tau = self.cfg.temperature
        q1, k2 = self.query(x1), self.keys(x2)  # [N, D] each
        # Snapshot of the queue: it is overwritten in place below, while backward still needs it.
        negatives = self.queue.clone()  # [K, D]
        # logits [q.k+, q.queue] / tau: [N, 1 + K], the positive in column 0 (MoCo Eq. 1)
        loss = info_nce(q1, k2, negatives, temperature=tau)
        if self.cfg.symmetric:  # both views serve as query once; mean keeps the scale of one term
            q2, k1 = self.query(x2), self.keys(x1)
            loss = (loss + info_nce(q2, k1, negatives, temperature=tau)) / 2
        if self.training:  # after the loss: this batch's keys are never negatives of themselves
            self._dequeue_and_enqueue(k2)
        return loss

    def _forward_v3(self, x1: Tensor, x2: Tensor) -> Tensor:
        q1, q2 = self.query(x1), self.query(x2)  # [N, D] each, separate BN batches as in the paper
        k1, k2 = self.keys(x1), self.keys(x2)  # [N, D] each
        return self._global_batch_loss(q1, k2) + self._global_batch_loss(q2, k1)

    def _global_batch_loss(self, q: Tensor, k: Tensor) -> Tensor:
        """ctr(q, k) of MoCo v3 Alg. 1: keys of every process are the candidates, scaled by 2 tau."""
        n, tau = q.shape[0], self.cfg.temperature
        # Keys come from the momentum encoder and carry no gradient, so the plain gather suffices.
        k_all = distributed.gather_no_grad(k)  # [N, D] -> [W*N, D]
        positive_index = distributed.rank() * n + torch.arange(n, device=q.device)  # [N]
        return info_nce(q, k_all, temperature=tau, positive_index=positive_index) * (2 * tau)

    @torch.no_grad()
    def _dequeue_and_enqueue(self, k: Tensor) -> None:
        """Write the keys of all processes, in rank order, over the oldest rows of the queue."""
        k_all = distributed.gather_no_grad(k)  # [N, D] -> [W*N, D]
        size, step_keys = self.queue.shape[0], k_all.shape[0]
        if size % step_keys:
            raise ConfigError(
                f"method.queue_size={size} must be a multiple of the keys enqueued per step, "
                f"data.batch_size {k.shape[0]} x {step_keys // k.shape[0]} processes = {step_keys}; "
                f"e.g. method.queue_size={max(1, size // step_keys) * step_keys}, or change data.batch_size."
            )
        rows = (self.queue_ptr + torch.arange(step_keys, device=k_all.device)) % size  # [W*N], no host sync
        # Keys of a diverged step (skipped by train.skip_nonfinite) must not poison every later loss:
        # then the queue and pointer stay as they were. A device-side choice, again no host sync.
        finite = torch.isfinite(k_all).all()  # [] bool
        new_rows = torch.where(finite, k_all.to(self.queue.dtype), self.queue[rows])  # [W*N, D]
        self.queue.index_copy_(0, rows, new_rows)  # queue: [K, D]
        self.queue_ptr.add_(finite.long() * step_keys).remainder_(size)

    def backbone_passes(self, views: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        x1, x2 = views
        if self.v3 or self.cfg.symmetric:  # both views as queries, both through the key encoder
            return [x1, x2], [x1, x2]
        return [x1], [x2]  # query x1 with backward, key x2 forward only

    # -- after each optimizer step ----------------------------------------------------------------

    def momentum_at(self, progress: float) -> float:
        if self.cfg.momentum_schedule == "cosine":
            return cosine_momentum(progress, self.cfg.momentum)
        return self.cfg.momentum

    def after_step(self, progress: float) -> None:
        # Buffers (the key BN's running stats) are averaged too; in train mode BN uses batch
        # statistics, so for MoCo the policy never changes a loss (see selfsup.momentum).
        momentum_update(
            [self.encoder, self.projector], [self.momentum_encoder, self.momentum_projector],
            self.momentum_at(progress), buffers="average",
        )
