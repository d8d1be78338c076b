"""Two-process checks of BYOL, Barlow Twins and VICReg: 2 processes x B equal 1 process x 2B.

Run through `tests/multiproc.run_workers` with the output directory as argv[1]; every rank writes
`rank<r>.json` (check name -> "ok" or the traceback). Each check trains in float64 with BatchNorm in train
mode in the backbone and the projector (global BN: GlobalBatchNorm on gloo, as `sync_bn` unset gives on
several processes), wraps the method in DDP, and compares the mean loss over ranks, every parameter
gradient after DDP's average and every BN running statistic with a single-process reference that sees the
whole batch of 2B and has plain BN and no gather.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from torch import nn
from torch.testing import assert_close

from selfsup.batchnorm import GlobalBatchNorm
from selfsup.distributed import all_reduce_mean
from selfsup.losses import barlow_twins_loss, byol_loss, vicreg_loss
from selfsup.methods.barlow_twins import BarlowTwins, BarlowTwinsConfig
from selfsup.methods.byol import BYOL, BYOLConfig
from selfsup.methods.vicreg import VICReg, VICRegConfig
from tests.workers.harness import finish, start

B, IMAGE = 4, 6  # per-process batch, image size
HEAD = {"proj_hidden_dim": 8, "proj_out_dim": 5}
SEEDS = {"byol": 11, "barlow_twins": 12, "vicreg": 13}  # fixed: str hashes differ between processes


def tiny_backbone() -> nn.Module:
    """Conv-BN-ReLU-pool: a sample's features depend on the rest of its batch through BN."""
    backbone = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    backbone.embed_dim = 6
    return backbone


def global_views(seed: int, n: int) -> list[torch.Tensor]:
    """Two views of the global batch, identical on every rank: [n, 3, IMAGE, IMAGE] each, float64."""
    g = torch.Generator().manual_seed(seed)
    # shifted and scaled so BN's statistics differ clearly between the two halves of the batch
    return [torch.randn(n, 3, IMAGE, IMAGE, generator=g, dtype=torch.float64) * 2 + 0.5 for _ in range(2)]


def pair(cls, config) -> tuple[nn.Module, nn.Module]:
    """The method as several processes build it (sync_bn unset: global BN) and a plain-BN reference copy."""
    torch.manual_seed(3)
    backbone = tiny_backbone()
    reference = cls(copy.deepcopy(backbone), config(sync_bn=False)).double()
    method = cls(backbone, config()).double()
    norms = [m for m in method.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert norms and all(isinstance(m, GlobalBatchNorm) for m in norms), norms
    projector_norms = [m for m in method.projector.modules() if isinstance(m, GlobalBatchNorm)]
    assert projector_norms, "the check must include BN in the projector"
    reference.load_state_dict(method.state_dict())
    return method, reference


def check_method(name: str, w: int, r: int, accelerator: Accelerator, cls, config, reference_loss) -> None:
    method, reference = pair(cls, config)
    model = accelerator.prepare(method)
    v1g, v2g = global_views(SEEDS[name], w * B)  # [W*B, 3, IMAGE, IMAGE] each
    rows = slice(r * B, (r + 1) * B)
    loss = model(([v1g[rows], v2g[rows]], None)).loss
    accelerator.backward(loss)

    ref_loss = reference_loss(reference, v1g, v2g)  # one process, the whole batch, no gather
    ref_loss.backward()
    assert_close(all_reduce_mean(loss.detach()), ref_loss.detach())
    unwrapped = accelerator.unwrap_model(model)
    checked = 0
    for (pname, p), (_, q) in zip(unwrapped.named_parameters(), reference.named_parameters()):
        assert (p.grad is None) == (q.grad is None), pname
        if p.grad is not None:
            assert_close(p.grad, q.grad, msg=lambda m: f"{name} {pname}: {m}")
            checked += 1
    assert checked >= 6, f"{name}: only {checked} gradients compared"
    for (bname, a), (_, b) in zip(unwrapped.named_buffers(), reference.named_buffers()):
        assert_close(a.to(b.dtype), b, msg=lambda m: f"{name} {bname}: {m}")


def byol_reference(ref: BYOL, v1: torch.Tensor, v2: torch.Tensor) -> torch.Tensor:
    p1, p2 = ref.online(v1), ref.online(v2)  # [2B, D] each; the method's order, so BN running stats match
    z1, z2 = ref.target(v1), ref.target(v2)
    return byol_loss(p1, z2) + byol_loss(p2, z1)


def barlow_twins_reference(ref: BarlowTwins, v1: torch.Tensor, v2: torch.Tensor) -> torch.Tensor:
    z1, z2 = ref.projector(ref.encoder(v1)), ref.projector(ref.encoder(v2))  # [2B, D] each
    return barlow_twins_loss(z1, z2, ref.cfg.off_diagonal_weight)


def vicreg_reference(ref: VICReg, v1: torch.Tensor, v2: torch.Tensor) -> torch.Tensor:
    z1, z2 = ref.projector(ref.encoder(v1)), ref.projector(ref.encoder(v2))  # [2B, D] each
    return vicreg_loss(z1, z2, 25.0, 25.0, 1.0)


def main(out_dir: Path) -> None:
    accelerator, w, r = start(nprocs=2)

    def byol_config(**kw):
        return BYOLConfig(pred_hidden_dim=8, **HEAD, **kw)

    def barlow_twins_config(**kw):
        return BarlowTwinsConfig(proj_layers=3, off_diagonal_weight=0.3, **HEAD, **kw)  # lambda large: both terms count

    def vicreg_config(**kw):
        return VICRegConfig(proj_layers=3, **HEAD, **kw)

    finish(accelerator, out_dir, {
        "byol": lambda: check_method("byol", w, r, accelerator, BYOL, byol_config, byol_reference),
        "barlow_twins": lambda: check_method("barlow_twins", w, r, accelerator, BarlowTwins, barlow_twins_config,
                                             barlow_twins_reference),
        "vicreg": lambda: check_method("vicreg", w, r, accelerator, VICReg, vicreg_config, vicreg_reference),
    })


if __name__ == "__main__":
    main(Path(sys.argv[1]))
