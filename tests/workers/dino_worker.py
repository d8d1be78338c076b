"""Two-process DINO checks: the centre is the same on both ranks and the EMA of the mean over the global batch;
the loss and gradients of 2 x B equal those of 1 x 2B (compared by tests/test_dino.py from rank 0's files).

Run through `tests/multiproc.run_workers` with the output directory as argv[1]; every rank writes `rank<r>.json`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors.torch import save_file
from torch.testing import assert_close

from selfsup.backbones import create_backbone
from selfsup.distributed import all_reduce_mean, gather_no_grad
from selfsup.methods.dino import DINO, DINOConfig
from tests.workers.harness import finish, start

B, IMAGE, LOCAL = 4, 16, 8  # per-process batch, global and local crop sides


def tiny_dino() -> DINO:
    """A ViT (no BatchNorm: a sample's output does not depend on its batch), float64, last layer not frozen."""
    torch.manual_seed(0)
    vit = create_backbone("vit_tiny_patch4", img_size=IMAGE, depth=1, embed_dim=16, num_heads=2, dynamic_img_size=True)
    cfg = DINOConfig(out_dim=32, hidden_dim=32, bottleneck_dim=8, freeze_last_layer=0.0)
    model = DINO(vit, cfg).double()
    model.on_fit_start(3, 10, 2)  # epoch 1.5 of the teacher temperature's warm-up
    return model


def global_views(seed: int, n: int) -> list[torch.Tensor]:
    """2 global + 2 local crops of the global batch, identical on every rank."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 3, size, size, generator=g, dtype=torch.float64) for size in (IMAGE, IMAGE, LOCAL, LOCAL)]


def check_center_loss_and_grads(w: int, r: int, accelerator: Accelerator, out_dir: Path) -> None:
    """Step 1 (no gradient) moves the centre away from 0; step 2's loss uses it, with gradients."""
    model = accelerator.prepare(tiny_dino())
    unwrapped = accelerator.unwrap_model(model)
    rows = slice(r * B, (r + 1) * B)
    first, second = global_views(1, w * B), global_views(2, w * B)
    with torch.no_grad():
        model(([x[rows] for x in first], None))
    center = unwrapped.center.clone()  # [1, K]
    with torch.no_grad():  # the mean over the concatenated global batch of both ranks
        expected = 0.1 * unwrapped.teacher(first[:2]).mean(dim=(0, 1))  # 0.9 x 0 + 0.1 x mean
    loss = model(([x[rows] for x in second], None)).loss
    accelerator.backward(loss)
    both = gather_no_grad(center)  # [W, K]
    mean_loss = all_reduce_mean(loss.detach())
    assert torch.equal(both[0], both[1]), "the ranks' centres differ"
    assert_close(center[0], expected, rtol=1e-12, atol=1e-14)
    if r == 0:
        grads = {n: p.grad.contiguous() for n, p in unwrapped.named_parameters() if p.grad is not None}
        save_file(grads, str(out_dir / "grads.safetensors"))
        save_file({"center": unwrapped.center.contiguous()}, str(out_dir / "center.safetensors"))
        (out_dir / "loss.json").write_text(json.dumps({"mean_loss": mean_loss.item(), "world_size": w}))


def main(out_dir: Path) -> None:
    accelerator, w, r = start(nprocs=2)
    finish(accelerator, out_dir, {"center_loss_and_grads": lambda: check_center_loss_and_grads(w, r, accelerator, out_dir)})


if __name__ == "__main__":
    main(Path(sys.argv[1]))
