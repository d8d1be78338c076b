"""lightly's SimCLR, as its example trains it, on the protocol of issue 13 defect 7 (docs/compare_lightly.md).

Run it with a Python that has lightly 1.6 (a scratch venv; lightly is not a dependency of this project):

    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 /work/venv-lightly/bin/python \
        tools/compare/lightly_simclr.py --seed 0 --out runs/compare/lightly_s0

lightly's side, as in lightly-ai/lightly examples/pytorch/simclr.py (one forward per view, `z0 = model(x0)`,
`z1 = model(x1)`) with the recipe of lightly's CIFAR-10 benchmark (SGD 0.06, momentum 0.9, wd 5e-4 on every
parameter, cosine): timm resnet18 (num_classes=0) at 32 px, SimCLRTransform(input_size=32, cj_strength=1.0
-> jitter 0.8/0.8/0.8/0.2, gaussian_blur=0), SimCLRProjectionHead(512, 512, 128), NTXentLoss(0.5), batch 256
(drop_last), cosine per step to 0. The training images are the same 20k Fashion-MNIST images (3 channels) as
configs/compare/simclr_lightly_protocol.yaml with train.seed = --seed: selfsup's seeded subset, only its indices.
Then a weighted kNN (k 200, T 0.1, cosine) on the full splits (60k / 10k), images resized 28 -> 32 and
normalised as it trained (ImageNet statistics unless --normalize fmnist). Writes losses.jsonl and result.json
to --out. --bn concat and --normalize fmnist take this project's choice for one factor at a time.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import timm
import torch
from lightly.loss import NTXentLoss
from lightly.models.modules import SimCLRProjectionHead
from lightly.transforms import SimCLRTransform
from lightly.transforms.utils import IMAGENET_NORMALIZE
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # selfsup, for the same image subset only
from selfsup.data import build_dataset


class RGBDataset(Dataset):
    """(transform(RGB PIL image), label) of a dataset of (PIL image, label)."""

    def __init__(self, base: Dataset, transform) -> None:
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        image, label = self.base[i]
        return self.transform(image.convert("RGB")), label


class SimCLRModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = timm.create_model("resnet18", num_classes=0)
        self.projection_head = SimCLRProjectionHead(512, 512, 128)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection_head(self.backbone(x))


@torch.no_grad()
def features(backbone: nn.Module, dataset: Dataset, batch_size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    feats, labels = [], []
    for x, y in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        feats.append(nn.functional.normalize(backbone(x), dim=1))  # [B, 512], unit length
        labels.append(torch.as_tensor(y))
    return torch.cat(feats), torch.cat(labels)


@torch.no_grad()
def weighted_knn_top1(train_f, train_y, test_f, test_y, k: int = 200, temperature: float = 0.1) -> float:
    """Wu et al. 2018: the k most cosine-similar train features vote for their class with weight exp(sim / T)."""
    num_classes = int(train_y.max()) + 1
    correct = 0
    for start in range(0, len(test_f), 1000):
        sim = test_f[start:start + 1000] @ train_f.T  # [M, N]
        top_sim, top_idx = sim.topk(k, dim=1)  # [M, k]
        votes = torch.zeros(len(top_sim), num_classes)
        votes.scatter_add_(1, train_y[top_idx], (top_sim / temperature).exp())
        correct += (votes.argmax(1) == test_y[start:start + 1000]).sum().item()
    return correct / len(test_f)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True)
    parser.add_argument("--subset", type=int, default=20000)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=0.06)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--min-scale", type=float, default=0.08, help="SimCLRTransform min_scale (crop scale low end)")
    parser.add_argument("--bn", choices=("per_view", "concat"), default="per_view",
                        help="per_view: the example's model(x0), model(x1); concat: one pass over both views (as ours)")
    parser.add_argument("--normalize", choices=("imagenet", "fmnist"), default="imagenet",
                        help="SimCLRTransform's default ImageNet statistics, or Fashion-MNIST's (0.2860 / 0.3530, as ours)")
    parser.add_argument("--stop-after", type=int, default=None,
                        help="stop after this many steps and skip the kNN (the cosine still spans the whole run)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    normalize = IMAGENET_NORMALIZE if args.normalize == "imagenet" else {"mean": [0.2860] * 3, "std": [0.3530] * 3}
    transform = SimCLRTransform(input_size=32, cj_strength=1.0, gaussian_blur=0.0, min_scale=args.min_scale,
                                normalize=normalize)
    train_images = build_dataset("fashion_mnist", split="train", subset=args.subset, seed=args.seed)
    loader = DataLoader(RGBDataset(train_images, transform), batch_size=args.batch_size, shuffle=True, drop_last=True,
                        num_workers=0, generator=torch.Generator().manual_seed(args.seed))
    model = SimCLRModel()
    criterion = NTXentLoss(temperature=0.5)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr * args.batch_size / 256, momentum=0.9, weight_decay=5e-4)
    total_steps = args.epochs * len(loader)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)  # stepped per update

    step, start = 0, time.perf_counter()
    with open(out / "losses.jsonl", "w") as log:
        for _ in range(args.epochs):
            model.train()
            for (x0, x1), _ in loader:
                if args.bn == "per_view":  # the example: one forward per view, BN statistics over each view's N images
                    z0, z1 = model(x0), model(x1)
                else:  # one forward over both views, BN statistics over all 2N
                    z0, z1 = model(torch.cat([x0, x1])).chunk(2)
                loss = criterion(z0, z1)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                scheduler.step()
                step += 1
                log.write(json.dumps({"step": step, "loss": loss.item()}) + "\n")
                log.flush()
                if step % 10 == 0:
                    print(f"step {step}/{total_steps} loss {loss.item():.4f} ({time.perf_counter() - start:.0f} s)",
                          flush=True)
                if step == args.stop_after:
                    break
            if step == args.stop_after:
                break
    train_s = time.perf_counter() - start
    losses = [json.loads(line)["loss"] for line in (out / "losses.jsonl").read_text().splitlines()]
    loss_at = {s: round(losses[s - 1], 4) for s in (1, 10, 30, 50, 70) if s <= len(losses)}
    settings = {"seed": args.seed, "min_scale": args.min_scale, "bn": args.bn, "normalize": args.normalize}
    if args.stop_after is not None:
        result = {**settings, "steps": step, "train_s": round(train_s, 1), "loss_at": loss_at}
        (out / "result.json").write_text(json.dumps(result, indent=1))
        print(json.dumps(result))
        return result

    model.eval()
    eval_transform = T.Compose([T.Resize(32), T.ToTensor(), T.Normalize(normalize["mean"], normalize["std"])])
    train_f, train_y = features(model.backbone, RGBDataset(build_dataset("fashion_mnist", split="train"), eval_transform))
    test_f, test_y = features(model.backbone, RGBDataset(build_dataset("fashion_mnist", split="test"), eval_transform))
    top1 = weighted_knn_top1(train_f, train_y, test_f, test_y)
    result = {**settings, "knn_top1": round(100 * top1, 2), "steps": step, "train_s": round(train_s, 1),
              "loss_at": loss_at, "train_size": len(train_y), "test_size": len(test_y)}
    torch.save(model.backbone.state_dict(), out / "backbone.pt")
    (out / "result.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result))
    assert all(math.isfinite(v) for v in losses)
    return result


if __name__ == "__main__":
    main()
