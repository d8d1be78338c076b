"""Frozen-encoder evaluation: feature extraction and the weighted kNN classifier.

kNN follows Wu et al. 2018 (InstDisc), the protocol of the SSL tables: cosine similarity, the k
nearest training features vote with weight exp(sim / T). Similarities are computed in blocks of
test x train rows with a running top-k, so a 1M x 1k feature bank fits in memory.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset


@torch.no_grad()
def extract_features(
    encoder: nn.Module, loader: DataLoader, device: torch.device | str = "cpu", *, bf16: bool | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled features of every image in `loader` (eval mode, no augmentation): ([N, D] float32, [N] long).

    bf16 autocast defaults to on for CUDA; pass bf16=True on CPUs with AMX (as training did).
    """
    was_training = encoder.training
    encoder.eval()
    device = torch.device(device)
    features, labels = [], []
    for images, targets in loader:
        images = images.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda" if bf16 is None else bf16):
            out = encoder(images)
        features.append(out.float().cpu())
        labels.append(torch.as_tensor(targets).cpu())
    encoder.train(was_training)
    return torch.cat(features), torch.cat(labels).long()


@torch.no_grad()
def knn_predict(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    *,
    k: int = 200,
    temperature: float = 0.1,
    num_classes: int | None = None,
    test_block: int = 1024,
    train_block: int = 65536,
) -> torch.Tensor:
    """Class scores [M, num_classes] of the weighted kNN vote; train: [N, D], test: [M, D]."""
    if train_features.shape[0] != train_labels.shape[0]:
        raise ValueError(f"{train_features.shape[0]} train features but {train_labels.shape[0]} labels")
    if train_features.shape[1] != test_features.shape[1]:
        raise ValueError(f"feature sizes differ: train {train_features.shape[1]} vs test {test_features.shape[1]}")
    num_classes = num_classes or int(train_labels.max()) + 1
    k = min(k, train_features.shape[0])
    train = F.normalize(train_features.float(), dim=1)
    test = F.normalize(test_features.float(), dim=1)
    scores = torch.empty(test.shape[0], num_classes)
    for start in range(0, test.shape[0], test_block):
        q = test[start : start + test_block]  # [b, D]
        best_sim = torch.full((q.shape[0], 0), float("-inf"))
        best_idx = torch.zeros((q.shape[0], 0), dtype=torch.long)
        for t0 in range(0, train.shape[0], train_block):
            sim = q @ train[t0 : t0 + train_block].T  # [b, D] x [D, c] -> [b, c]
            cand_sim = torch.cat([best_sim, sim], dim=1)
            cand_idx = torch.cat([best_idx, torch.arange(t0, t0 + sim.shape[1]).expand(q.shape[0], -1)], dim=1)
            best_sim, pos = cand_sim.topk(min(k, cand_sim.shape[1]), dim=1)  # running top-k: [b, k]
            best_idx = cand_idx.gather(1, pos)
        weights = (best_sim / temperature).exp()  # [b, k]
        votes = F.one_hot(train_labels[best_idx], num_classes).float()  # [b, k, classes]
        scores[start : start + q.shape[0]] = (votes * weights.unsqueeze(-1)).sum(1)
    return scores


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """Top-k accuracies in percent; k larger than the class count counts as all classes."""
    out = {}
    for k in ks:
        kk = min(k, scores.shape[1])
        hit = (scores.topk(kk, dim=1).indices == labels.unsqueeze(1)).any(dim=1)
        out[f"top{k}"] = 100.0 * hit.float().mean().item()
    return out


def knn_evaluate(
    train_features, train_labels, test_features, test_labels, *, k: int = 200, temperature: float = 0.1
) -> dict[str, float]:
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    scores = knn_predict(train_features, train_labels, test_features, k=k, temperature=temperature, num_classes=num_classes)
    return topk_accuracy(scores, test_labels)


class KNNMonitor:
    """kNN top-1 of the encoder on a labelled train/test pair; called by the engine every few epochs."""

    def __init__(self, train_set: Dataset, test_set: Dataset, *, k: int, temperature: float,
                 batch_size: int = 256, num_workers: int = 0, device: torch.device | str = "cpu",
                 bf16: bool | None = None):
        self.loaders = [
            DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers) for ds in (train_set, test_set)
        ]
        self.k, self.temperature, self.device, self.bf16 = k, temperature, device, bf16

    def __call__(self, method: nn.Module) -> dict[str, Any]:
        encoder = getattr(method, "encoder", method)
        train_f, train_y = extract_features(encoder, self.loaders[0], self.device, bf16=self.bf16)
        test_f, test_y = extract_features(encoder, self.loaders[1], self.device, bf16=self.bf16)
        acc = knn_evaluate(train_f, train_y, test_f, test_y, k=self.k, temperature=self.temperature)
        return {f"knn_{name}": value for name, value in acc.items()}
