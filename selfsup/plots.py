"""PNG plots of a run (loss, learning rate, kNN accuracy; masked-image reconstructions), written
next to metrics.jsonl."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def plot_metrics(metrics_file: str | Path, out_dir: str | Path) -> Path | None:
    """One figure with a panel per logged curve; returns the PNG path (None when nothing was logged)."""
    metrics_file = Path(metrics_file)
    if not metrics_file.is_file():
        return None
    records = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    keys = [k for k in ("loss", "lr", "images_per_sec", "knn_top1") if any(k in r for r in records)]
    if not keys:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3), squeeze=False)
    for ax, key in zip(axes[0], keys):
        points = [(r["step"], r[key]) for r in records if key in r]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o" if len(points) < 20 else None)
        ax.set_title(key)
        ax.set_xlabel("step")
    fig.tight_layout()
    out = Path(out_dir) / "metrics.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def save_reconstruction_grid(
    images: dict[str, Any], path: str | Path, mean: Sequence[float], std: Sequence[float]
) -> Path:
    """One row per entry (original / masked / reconstruction), one column per image, denormalised for display.

    Every value is a [N, C, H, W] tensor in the normalised space the model sees; `mean`/`std` undo it.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    names = list(images)
    count = images[names[0]].shape[0]
    mean_t = torch.tensor(list(mean), dtype=torch.float32).view(-1, 1, 1)
    std_t = torch.tensor(list(std), dtype=torch.float32).view(-1, 1, 1)
    fig, axes = plt.subplots(len(names), count, figsize=(1.3 * count, 1.4 * len(names)), squeeze=False)
    for row, name in enumerate(names):
        for col in range(count):
            pixels = (images[name][col].detach().float().cpu() * std_t + mean_t).clamp(0, 1)  # [C, H, W] in [0, 1]
            ax = axes[row][col]
            if pixels.shape[0] == 1:
                ax.imshow(pixels[0].numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            else:
                ax.imshow(pixels.permute(1, 2, 0).numpy(), interpolation="nearest")  # [H, W, C]
            ax.set_xticks([])
            ax.set_yticks([])
            if col == 0:
                ax.set_ylabel(name, fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


class ReconstructionGrid:
    """Evaluation hook for methods with `reconstruct`: the same images every time, one PNG per call in
    `out_dir/reconstructions/` (numbered) and the latest also as `out_dir/reconstruction.png`.
    """

    def __init__(self, images: Any, out_dir: str | Path, mean: Sequence[float], std: Sequence[float]) -> None:
        self.images = images  # [N, C, H, W], normalised
        self.out_dir = Path(out_dir)
        self.mean, self.std = list(mean), list(std)

    @classmethod
    def from_dataset(cls, dataset: Any, out_dir: str | Path, mean: Sequence[float], std: Sequence[float],
                     count: int = 8) -> "ReconstructionGrid":
        """`count` images spread evenly over a dataset of (image tensor, label) items."""
        import torch

        count = min(count, len(dataset))
        indices = torch.linspace(0, len(dataset) - 1, count).round().long().tolist()
        return cls(torch.stack([dataset[i][0] for i in indices]), out_dir, mean, std)

    def __call__(self, method: Any) -> dict[str, float]:
        import shutil

        was_training = method.training
        method.eval()
        device = next(method.parameters()).device
        images = method.reconstruct(self.images.to(device))
        method.train(was_training)
        if images is not None:
            folder = self.out_dir / "reconstructions"
            number = len(list(folder.glob("*.png"))) if folder.is_dir() else 0
            path = save_reconstruction_grid(images, folder / f"{number:03d}.png", self.mean, self.std)
            shutil.copyfile(path, self.out_dir / "reconstruction.png")
        return {}
