"""PNG plots of a run (loss, learning rate, kNN accuracy), written next to metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path


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
