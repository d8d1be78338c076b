"""Multi-crop on the device: views of several sizes (DINO's 2 global + N local crops) from one uint8 batch.

`BatchedViews` makes views of one size; here the views are cut into runs of equal `crop_size` (in view
order, as the method expects them: globals first) and each run is one `BatchedViews`, drawing from the same
generator in turn. The per-image counterpart is `transforms.build_views` with `local_crops` > 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from selfsup.batched_views import BatchedViews

__all__ = ["MultiSizeViews", "size_groups"]


def size_groups(params: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Consecutive views of equal crop_size: [[global, global], [local x N]] for DINO."""
    groups: list[list[dict[str, Any]]] = []
    for p in params:
        if groups and groups[-1][0]["crop_size"] == p["crop_size"]:
            groups[-1].append(p)
        else:
            groups.append([p])
    return groups


class MultiSizeViews:
    """`(uint8 images [B, C, H, W], labels)` -> `(V x [B, C, S_v, S_v], labels)`, one BatchedViews per size run."""

    def __init__(self, params: list[dict[str, Any]], mean: Sequence[float], std: Sequence[float], in_chans: int) -> None:
        self.groups = [BatchedViews(group, group[0]["crop_size"], mean, std, in_chans) for group in size_groups(params)]
        self.params = [p for group in self.groups for p in group.params]
        self.in_chans = in_chans

    @property
    def num_views(self) -> int:
        return len(self.params)

    def make_views(self, images: torch.Tensor, generator: torch.Generator | None = None) -> list[torch.Tensor]:
        return [view for group in self.groups for view in group.make_views(images, generator)]

    def compile(self) -> MultiSizeViews:
        for group in self.groups:
            group.compile()
        return self

    def __call__(self, batch: Any, generator: torch.Generator | None = None) -> Any:
        images, *rest = batch
        return (self.make_views(images, generator), *rest)

    def __repr__(self) -> str:
        return "MultiSizeViews(\n" + "\n".join(f"  {group!r}" for group in self.groups) + ")"
