"""Two-process DINO and iBOT checks: the centres (iBOT: [CLS] and patch) are the same on both ranks and the EMA of
the mean over the global batch; the loss and gradients of 2 x B equal those of 1 x 2B (compared by
tests/test_dino.py from rank 0's files).

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
from selfsup.methods.ibot import IBOT, IBOTConfig
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


def tiny_ibot(masks: torch.Tensor) -> IBOT:
    """iBOT with its own patch prototypes (shared_head false), float64; `masks` [G, N, h, w] replace the random
    draw so that 1 x 2B and each rank's B rows see the same masks (rank r takes rows r*B ... of every crop)."""
    torch.manual_seed(0)
    vit = create_backbone("vit_tiny_patch4", img_size=IMAGE, depth=1, embed_dim=16, num_heads=2, dynamic_img_size=True)
    cfg = IBOTConfig(out_dim=32, patch_out_dim=24, shared_head=False, hidden_dim=32, bottleneck_dim=8,
                     freeze_last_layer=0.0)
    model = IBOT(vit, cfg).double()
    model.on_fit_start(3, 10, 2)
    model.draw_masks = lambda n, grid: masks.flatten(0, 1)  # [G*N, h, w], crop-major as the model stacks them
    return model


def ibot_masks(seed: int, n: int) -> torch.Tensor:
    """[2, n, h, w] masks of the global crops, about 30 % of the patches, identical on every rank."""
    g = torch.Generator().manual_seed(seed)
    side = IMAGE // 4
    return torch.rand(2, n, side, side, generator=g) < 0.3


def global_views(seed: int, n: int) -> list[torch.Tensor]:
    """2 global + 2 local crops of the global batch, identical on every rank."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 3, size, size, generator=g, dtype=torch.float64) for size in (IMAGE, IMAGE, LOCAL, LOCAL)]


def save_reference(out_dir: Path, prefix: str, model, centres: tuple[str, ...], mean_loss, w: int) -> None:
    """Rank 0's gradients, centres and mean loss, for the test to compare with 1 process x 2B."""
    grads = {n: p.grad.contiguous() for n, p in model.named_parameters() if p.grad is not None}
    save_file(grads, str(out_dir / f"{prefix}grads.safetensors"))
    save_file({c: getattr(model, c).contiguous() for c in centres}, str(out_dir / f"{prefix}center.safetensors"))
    (out_dir / f"{prefix}loss.json").write_text(json.dumps({"mean_loss": mean_loss.item(), "world_size": w}))


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
        save_reference(out_dir, "", unwrapped, ("center",), mean_loss, w)


def check_ibot_centres_loss_and_grads(w: int, r: int, accelerator: Accelerator, out_dir: Path) -> None:
    """As the DINO check, for iBOT's two centres and its [CLS] + masked-patch loss."""
    rows = slice(r * B, (r + 1) * B)
    first_masks, second_masks = ibot_masks(3, w * B), ibot_masks(4, w * B)
    local = tiny_ibot(first_masks[:, rows])
    model = accelerator.prepare(local)
    first, second = global_views(1, w * B), global_views(2, w * B)
    with torch.no_grad():
        model(([x[rows] for x in first], None))
        teacher = tiny_ibot(first_masks)  # the same initial weights: its tokens on the whole global batch
        tokens = teacher.teacher_backbone.forward_features(torch.cat(first[:2]))  # [G*N, 1 + L, D]
        expected_cls = 0.1 * teacher.teacher_head(tokens[:, 0]).mean(dim=0)
        expected_patch = 0.1 * teacher.teacher_head(tokens[:, 1:].flatten(0, 1), patch=True).mean(dim=0)
    centres = {"center": local.center.clone(), "patch_center": local.patch_center.clone()}  # after step 1
    local.draw_masks = lambda n, grid: second_masks[:, rows].flatten(0, 1)
    loss = model(([x[rows] for x in second], None)).loss
    accelerator.backward(loss)
    for name, expected in (("center", expected_cls), ("patch_center", expected_patch)):
        both = gather_no_grad(getattr(local, name))  # [W, K] after step 2
        assert torch.equal(both[0], both[1]), f"the ranks' {name} differ"
        assert_close(centres[name][0], expected, rtol=1e-12, atol=1e-14, msg=lambda m, name=name: f"{name}: {m}")
    mean_loss = all_reduce_mean(loss.detach())
    if r == 0:
        save_reference(out_dir, "ibot_", local, ("center", "patch_center"), mean_loss, w)


def main(out_dir: Path) -> None:
    accelerator, w, r = start(nprocs=2)
    finish(accelerator, out_dir, {
        "center_loss_and_grads": lambda: check_center_loss_and_grads(w, r, accelerator, out_dir),
        "ibot_centres_loss_and_grads": lambda: check_ibot_centres_loss_and_grads(w, r, accelerator, out_dir),
    })


if __name__ == "__main__":
    main(Path(sys.argv[1]))
