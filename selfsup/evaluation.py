"""Frozen-encoder evaluation: feature extraction, the weighted kNN classifier and the linear probe.

kNN follows Wu et al. 2018 (InstDisc), the protocol of the SSL tables: cosine similarity, the k
nearest training features vote with weight exp(sim / T). Similarities are computed in blocks of
test x train rows with a running top-k, so a 1M x 1k feature bank fits in memory.
The linear probe (MoCo; MAE with a BatchNorm before the layer) trains on cached features through
the same engine as pretraining and fine-tuning; `ClassifierEvaluator` scores any classifier.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from selfsup.averaging import recompute_batch_norm
from selfsup.config import Config
from selfsup.engine import FitResult, fit, make_loader
from selfsup.finetune import LinearHead, SupervisedTask
from selfsup.hardware import choose_precision


@torch.no_grad()
def _forward_all(
    module: nn.Module, loader: DataLoader, device: torch.device | str, bf16: bool | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """module(x) for every batch of `loader` in eval mode: ([N, ...] float32 on CPU, [N] long)."""
    was_training = module.training
    module.eval()
    device = torch.device(device)
    outputs, labels = [], []
    for inputs, targets in loader:
        inputs = inputs.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=_auto_bf16(device) if bf16 is None else bf16):
            out = module(inputs)
        outputs.append(out.float().cpu())
        labels.append(torch.as_tensor(targets).cpu())
    module.train(was_training)
    return torch.cat(outputs), torch.cat(labels).long()


def _auto_bf16(device: torch.device) -> bool:
    """bf16 autocast where `train.precision=auto` would train in it (never where it is emulated)."""
    return choose_precision("auto", device.type).mode == "bf16"


def extract_features(
    encoder: nn.Module, loader: DataLoader, device: torch.device | str = "cpu", *, bf16: bool | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled features of every image in `loader` (eval mode, no augmentation): ([N, D] float32, [N] long).

    bf16=None: bf16 autocast where `train.precision=auto` would use it (bf16 GPUs, CPUs with native bf16).
    """
    return _forward_all(encoder, loader, device, bf16)


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
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Class scores [M, num_classes] of the weighted kNN vote; train: [N, D], test: [M, D].

    Blocks of train rows are normalised and moved to `device` (default: the test features') on the fly,
    and each block keeps only its own top-k, so memory is N x D once plus O(test_block x train_block).
    """
    if train_features.shape[0] != train_labels.shape[0]:
        raise ValueError(f"{train_features.shape[0]} train features but {train_labels.shape[0]} labels")
    if train_features.shape[1] != test_features.shape[1]:
        raise ValueError(f"feature sizes differ: train {train_features.shape[1]} vs test {test_features.shape[1]}")
    device = torch.device(device) if device is not None else test_features.device
    num_classes = num_classes or int(train_labels.max()) + 1
    k = min(k, train_features.shape[0])
    labels = train_labels.to(device)
    scores = torch.empty(test_features.shape[0], num_classes)
    for start in range(0, test_features.shape[0], test_block):
        q = F.normalize(test_features[start : start + test_block].to(device).float(), dim=1)  # [b, D]
        best_sim = torch.empty(q.shape[0], 0, device=device)
        best_idx = torch.empty(q.shape[0], 0, dtype=torch.long, device=device)
        for t0 in range(0, train_features.shape[0], train_block):
            bank = F.normalize(train_features[t0 : t0 + train_block].to(device).float(), dim=1)  # [c, D]
            sim = q @ bank.T  # [b, D] x [D, c] -> [b, c]
            block_sim, block_pos = sim.topk(min(k, sim.shape[1]), dim=1)  # [b, k]
            cand_sim = torch.cat([best_sim, block_sim], dim=1)  # [b, <= 2k]
            cand_idx = torch.cat([best_idx, block_pos + t0], dim=1)
            best_sim, pos = cand_sim.topk(min(k, cand_sim.shape[1]), dim=1)  # running top-k: [b, k]
            best_idx = cand_idx.gather(1, pos)
        weights = (best_sim / temperature).exp()  # [b, k]
        votes = torch.zeros(q.shape[0], num_classes, device=device)
        votes.scatter_add_(1, labels[best_idx], weights)  # sum of weights per class: [b, classes]
        scores[start : start + q.shape[0]] = votes.cpu()
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
    train_features, train_labels, test_features, test_labels, *, k: int = 200, temperature: float = 0.1,
    num_classes: int | None = None, device: torch.device | str | None = None,
) -> dict[str, float]:
    """kNN top-1 / top-5 (percent) of the test features against the train features."""
    num_classes = num_classes or int(max(train_labels.max(), test_labels.max())) + 1
    scores = knn_predict(train_features, train_labels, test_features, k=k, temperature=temperature,
                         num_classes=num_classes, device=device)
    return topk_accuracy(scores, test_labels)


class PixelEncoder(nn.Module):
    """Raw pixels as features: the image tensor the encoder would see (eval transform), flattened.

    The baseline every accuracy stands beside (`--encoder pixels`, eval.pixel_baseline): an encoder
    that scores below it on the same protocol has learned nothing kNN or a linear layer can use.
    """

    def __init__(self, in_chans: int = 3, image_size: int = 32) -> None:
        super().__init__()
        self.embed_dim = in_chans * image_size * image_size
        self.backbone_name, self.backbone_kwargs = "pixels", {"in_chans": in_chans}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1).float()  # [B, C, H, W] -> [B, C*H*W]


class KNNMonitor:
    """kNN top-1 of the encoder on a labelled train/test pair; called by the engine every few epochs."""

    def __init__(self, train_set: Dataset, test_set: Dataset, *, k: int, temperature: float,
                 batch_size: int = 256, num_workers: int = 0, device: torch.device | str = "cpu",
                 bf16: bool | None = None, pixel_baseline: bool = False):
        self.loaders = [
            DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers) for ds in (train_set, test_set)
        ]
        self.k, self.temperature, self.device, self.bf16 = k, temperature, device, bf16
        self.pixel_baseline = pixel_baseline
        self._pixels: dict[str, Any] | None = None
        self.pixel_features: tuple[torch.Tensor, ...] | None = None
        # (train features, train labels, test features, test labels) of the latest call, for a linear probe
        # on the same features without a second pass over the images
        self.last_features: tuple[torch.Tensor, ...] | None = None

    def __call__(self, method: nn.Module) -> dict[str, Any]:
        encoder = getattr(method, "encoder", method)
        train_f, train_y = extract_features(encoder, self.loaders[0], self.device, bf16=self.bf16)
        test_f, test_y = extract_features(encoder, self.loaders[1], self.device, bf16=self.bf16)
        self.last_features = (train_f, train_y, test_f, test_y)
        acc = knn_evaluate(train_f, train_y, test_f, test_y, k=self.k, temperature=self.temperature, device=self.device)
        return {f"knn_{name}": value for name, value in acc.items()}

    def pixels(self) -> dict[str, Any]:
        """The same kNN on raw pixels (computed once): the floor a learned encoder has to clear."""
        if self._pixels is None:
            self._pixels = self(PixelEncoder())
            self.pixel_features = self.last_features
        return self._pixels


# --------------------------------------------------------------------------------------------
# linear probe and classifier scoring


class FeatureDataset(Dataset):
    """Cached features [N, D] and labels [N], indexable by the engine sampler's (epoch, index) keys."""

    def __init__(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        if features.shape[0] != labels.shape[0]:
            raise ValueError(f"{features.shape[0]} features but {labels.shape[0]} labels")
        self.features, self.labels = features, labels

    def __len__(self) -> int:
        return self.features.shape[0]

    def __getitem__(self, key: tuple[int, int] | int) -> tuple[torch.Tensor, torch.Tensor]:
        index = key[1] if isinstance(key, (tuple, list)) else key
        return self.features[index], self.labels[index]


def evaluate_classifier(
    model: nn.Module, loader: DataLoader, device: torch.device | str = "cpu", *, bf16: bool | None = None
) -> dict[str, float]:
    """Top-1 / top-5 (percent) of `model`'s logits on `loader`, in eval mode."""
    logits, labels = _forward_all(model, loader, device, bf16)
    return topk_accuracy(logits, labels)


class ClassifierEvaluator:
    """The engine's `evaluate` callback for a SupervisedTask: its model's top-1/top-5, its EMA's, and its SWA
    average's once it holds a snapshot (BatchNorm statistics first recomputed over `bn_batches`, the training
    data, as SWA prescribes; without them the average's BN buffers are those of the weights it started from)."""

    def __init__(self, test_set: Dataset, *, batch_size: int = 256, num_workers: int = 0,
                 device: torch.device | str = "cpu", bf16: bool | None = None, bn_batches: Any = None) -> None:
        self.loader = DataLoader(test_set, batch_size=batch_size, shuffle=False, num_workers=num_workers)
        self.device, self.bf16, self.bn_batches = device, bf16, bn_batches

    def __call__(self, task: nn.Module) -> dict[str, float]:
        out = evaluate_classifier(task.model, self.loader, self.device, bf16=self.bf16)
        if getattr(task, "ema", None) is not None:
            ema = evaluate_classifier(task.ema.module, self.loader, self.device, bf16=self.bf16)
            out.update({f"ema_{name}": value for name, value in ema.items()})
        swa = getattr(task, "swa", None)
        if swa is not None and int(swa.n_averaged) > 0:
            if self.bn_batches is None:
                raise ValueError("evaluating an SWA average needs bn_batches (the training data) to recompute its BatchNorm statistics")
            recompute_batch_norm(swa.module, self.bn_batches, self.device)
            scores = evaluate_classifier(swa.module, self.loader, self.device, bf16=self.bf16)
            out.update({f"swa_{name}": value for name, value in scores.items()})
            out["swa_snapshots"] = int(swa.n_averaged)
        return out


def logistic_regression_probe(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    weight_decay: float = 1e-3,
    max_iter: int = 100,
) -> dict[str, float]:
    """The quick linear probe: L2-regularised multinomial logistic regression on standardised cached features,
    fit full-batch by L-BFGS (SimCLR, Chen et al. 2020, appendix B.5, which tunes the L2 weight; here it is fixed).
    Deterministic and cheap enough to run at the end of every pretraining run (the quickstart's 5 000 raw-pixel
    features of 2 352 values, the costliest of its three probes: 23 s on one busy core, 100 iterations);
    tools/linear_probe.py is the SGD protocol of the papers. Returns test top-1 / top-5 in percent.
    """
    mean, std = train_features.mean(0), train_features.std(0).clamp_min(1e-6)
    x, x_test = (train_features - mean) / std, (test_features - mean) / std  # [N, D], [M, D]
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    weight = torch.zeros(x.shape[1], num_classes, requires_grad=True)  # [D, C]
    bias = torch.zeros(num_classes, requires_grad=True)  # [C]
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, history_size=10,
                                  tolerance_grad=1e-6, line_search_fn="strong_wolfe")

    def objective() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ weight + bias, train_labels) + 0.5 * weight_decay * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(objective)  # one call runs up to max_iter L-BFGS iterations
    with torch.no_grad():
        return topk_accuracy(x_test @ weight + bias, test_labels)  # [M, C]


def linear_probe(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    cfg: Config,
    accelerator: Accelerator,
    *,
    run_dir: str | Path,
    num_classes: int | None = None,
) -> dict[str, Any]:
    """Train a linear classifier on cached features with `engine.fit` (optim / train / data.batch_size of
    `cfg`, BatchNorm first if cfg.probe.batch_norm); returns the final test top-1 / top-5.
    """
    num_classes = num_classes or int(max(train_labels.max(), test_labels.max())) + 1
    head = LinearHead(train_features.shape[1], num_classes, batch_norm=cfg.probe.batch_norm, zero_init=cfg.probe.zero_init)
    task = SupervisedTask(head, num_classes)
    data_cfg = dataclasses.replace(cfg.data, num_workers=0)  # tensors in memory: workers only add overhead
    loader = make_loader(FeatureDataset(train_features, train_labels), data_cfg, seed=cfg.train.seed)
    evaluate = ClassifierEvaluator(TensorDataset(test_features, test_labels), batch_size=cfg.eval.batch_size,
                                   device=accelerator.device)
    if accelerator.is_main_process:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
    result = fit(task, loader, cfg, accelerator, run_dir=run_dir, evaluate=evaluate)
    return final_evaluation(result, task, evaluate, accelerator)


def final_evaluation(result: FitResult, task: nn.Module, evaluate, accelerator: Accelerator) -> dict[str, Any]:
    """The evaluation of the trained model: the engine's last one, or a fresh one when it ran none at the end."""
    last = result.eval_history[-1] if result.eval_history else None
    if last is not None and last.get("step") == result.steps:
        return dict(last)
    record: dict[str, Any] = {"step": result.steps, "epoch": result.epochs_completed}
    if accelerator.is_main_process:
        record.update(evaluate(task))  # prepare() moved this very module; its weights are the trained ones
    return record
