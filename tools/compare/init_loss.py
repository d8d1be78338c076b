"""NT-Xent (tau 0.5) at initialisation, this project's SimCLR against lightly's model, on the same views.

    /work/venv-lightly/bin/python tools/compare/init_loss.py --seeds 0 1 2 3 4

For each seed both models are built after torch.manual_seed(seed) (our SimCLR on timm resnet18 with the
512-512-128 projector; timm resnet18 + lightly's SimCLRProjectionHead), in train mode (batch statistics),
without any update, on 256 images of the comparison's seed-0 subset, with each pipeline's views.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import timm
import torch
from lightly.loss import NTXentLoss
from lightly.models.modules import SimCLRProjectionHead
from lightly.transforms import SimCLRTransform

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from selfsup.backbones import create_backbone
from selfsup.data import build_dataset, dataset_info
from selfsup.methods.simclr import SimCLR, SimCLRConfig
from selfsup.transforms import build_views


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--images", type=int, default=256)
    args = parser.parse_args()
    torch.set_num_threads(2)
    info = dataset_info("fashion_mnist")
    images = build_dataset("fashion_mnist", split="train", subset=20000, seed=0)
    images = [images[i][0].convert("RGB") for i in range(args.images)]
    pipelines = {
        "our_views": build_views("simclr_imagenet", image_size=32, mean=info.mean, std=info.std, in_chans=3, blur_p=0.0),
        "lightly_views": SimCLRTransform(input_size=32, cj_strength=1.0, gaussian_blur=0.0),
    }
    torch.manual_seed(123)
    views = {name: [torch.stack(v) for v in zip(*(p(im) for im in images))] for name, p in pipelines.items()}
    criterion = NTXentLoss(temperature=0.5)
    rows = []
    for seed in args.seeds:
        torch.manual_seed(seed)
        ours = SimCLR(create_backbone("resnet18"), SimCLRConfig(temperature=0.5, proj_hidden_dim=512, proj_out_dim=128))
        torch.manual_seed(seed)
        backbone, head = timm.create_model("resnet18", num_classes=0), SimCLRProjectionHead(512, 512, 128)
        for name, (x0, x1) in views.items():
            row = {"seed": seed, "views": name, "ours_concat": ours(([x0, x1], None)).loss.item()}
            ours.cfg.bn_per_view = True
            row["ours_per_view"] = ours(([x0, x1], None)).loss.item()
            ours.cfg.bn_per_view = False
            row["lightly_per_view"] = criterion(head(backbone(x0)), head(backbone(x1))).item()
            rows.append({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()})
            print(json.dumps(rows[-1]), flush=True)


if __name__ == "__main__":
    main()
