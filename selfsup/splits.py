"""Train/test pairs for evaluation (kNN monitor, linear probe, kNN and fine-tuning tools) that never share
an image: a folder without a test split of its own gets a fixed, stratified held-out part.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from selfsup.config import ConfigError
from selfsup.data import ImageFolderDataset, _fixed_subset, _image_folder_dir, _mix_seed, _subset, build_dataset

__all__ = ["build_train_test", "holdout_split", "unused_holdout"]


_ANNOUNCED_HOLDOUTS: set[tuple[str, float, int]] = set()


def build_train_test(
    name: str,
    *,
    train_split: str = "train",
    test_split: str = "test",
    max_train: int | None = None,
    max_test: int | None = None,
    max_train_key: str = "data.subset",
    max_test_key: str = "eval.max_test_samples",
    holdout_fraction: float = 0.2,
    holdout_seed: int = 0,
    root: str | os.PathLike | None = None,
    download: bool = False,
    seed: int = 0,
    image_size: int = 32,
    num_samples: int = 512,
    num_classes: int = 10,
) -> tuple[Dataset, Dataset]:
    """Raw train and test sets that never share an image.

    An image_folder without a test split of its own (no split folders at all, or train/ alone, or the
    test split named the same as the train split) gets a fixed, stratified held-out part of the training
    folder (`holdout_split`) as its test set. The caps
    `max_train` / `max_test` then draw fixed subsets of each part (a part within its cap is used whole);
    their config keys are named in errors.
    """
    common = dict(root=root, download=download, seed=seed, image_size=image_size,
                  num_samples=num_samples, num_classes=num_classes)
    folder = _image_folder_dir(root, train_split) if name == "image_folder" else None
    if folder is not None and folder.resolve() == _test_folder(Path(root).expanduser(), train_split, test_split):
        dataset = ImageFolderDataset(folder)
        if dataset.classes is None:
            train = test = dataset  # unlabelled: every caller refuses it before scoring anything
        else:
            train, test = holdout_split(dataset, holdout_fraction, holdout_seed)
            announced = (str(folder.resolve()), holdout_fraction, holdout_seed)
            if announced not in _ANNOUNCED_HOLDOUTS:
                _ANNOUNCED_HOLDOUTS.add(announced)
                where = f"has no {test_split}/ split" if not (Path(root).expanduser() / test_split).is_dir() \
                    else f"split {train_split!r} is also the test split ({test_split!r})"
                print(f"[selfsup] image_folder {where}: holding out {100 * holdout_fraction:g} % ({len(test)} images, "
                      f"stratified, seed {holdout_seed}) for evaluation (eval.holdout_fraction, eval.holdout_seed)",
                      flush=True)
    else:
        train = build_dataset(name, split=train_split, **common)
        test = build_dataset(name, split=test_split, **common)
    # caps, not sizes: a set smaller than its cap is used whole (a 10000-image default must not fail on 500)
    if max_train is not None and not (max_train >= len(train) > 0):
        train = _fixed_subset(train, max_train, seed, max_train_key)
    if max_test is not None and not (max_test >= len(test) > 0):
        test = _fixed_subset(test, max_test, seed, max_test_key)
    if getattr(train, "num_classes", None):
        _check_disjoint(train, test)
    return train, test


def _test_folder(root: Path, train_split: str, test_split: str) -> Path:
    """The resolved folder of the test split; the training folder's when there is none (the root without
    split folders, or train/ alone), which `build_train_test` then splits."""
    if not (root / test_split).is_dir() and (root / train_split).is_dir():
        others = [s for s in ("train", "val", "test") if s != train_split and (root / s).is_dir()]
        if not others:
            return (root / train_split).resolve()
    return _image_folder_dir(root, test_split).resolve()


def holdout_split(
    dataset: "ImageFolderDataset", fraction: float, seed: int = 0, key: str = "eval.holdout_fraction"
) -> tuple[Subset, Subset]:
    """(train, held-out) parts of a labelled folder: per class, round(fraction x n) images (at least 1,
    at most n - 1) picked by a permutation seeded by (seed, class index) alone, the rest for training."""
    if not 0.0 < fraction < 1.0:
        raise ConfigError(f"{key} must be in (0, 1) (e.g. 0.2), got {fraction}")
    labels = np.array([label for _, label in dataset.samples])
    train_indices: list[int] = []
    test_indices: list[int] = []
    for label, class_name in enumerate(dataset.classes):
        members = np.flatnonzero(labels == label)  # sorted dataset indices of this class
        if len(members) < 2:
            raise ConfigError(
                f"{dataset.root} has no test split and class {class_name!r} holds {len(members)} image: {key} "
                "holds out at least one image of every class and trains on the rest, so each class needs 2 or more; "
                "add images, or give the folder train/ and test/ sub-folders"
            )
        held = min(len(members) - 1, max(1, math.floor(fraction * len(members) + 0.5)))
        order = np.random.default_rng(_mix_seed(seed, label)).permutation(len(members))
        test_indices.extend(members[order[:held]].tolist())
        train_indices.extend(members[order[held:]].tolist())
    return _subset(dataset, sorted(train_indices)), _subset(dataset, sorted(test_indices))


def unused_holdout(used: list[Dataset], size: int, seed: int = 0, key: str = "--holdout") -> Subset:
    """`size` images (a fixed random draw by `seed`; all of them when fewer) of the set the first of `used` was
    drawn from, that none of `used` holds: a held-out part of a training split for choices made after training
    on it (the greedy soup's). `used` may hold sets of other sources (a separate test split); they are skipped."""
    base, _ = _source(used[0])
    taken: set[int] = set()
    for dataset in used:
        source, indices = _source(dataset)
        if type(source) is type(base) and len(source) == len(base) and getattr(source, "root", None) == getattr(base, "root", None):
            taken.update(indices)
    pool = [i for i in range(len(base)) if i not in taken]
    if not pool:
        raise ConfigError(
            f"the runs trained on all {len(base)} images of their training split, so none is left to hold out; "
            f"fine-tune them on a part of it (--max-train / data.subset, e.g. 5000) and keep the rest for {key}")
    if size < 1:
        raise ConfigError(f"{key} must be >= 1 (images held out of the training split), got {size}")
    order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(_mix_seed(seed, len(pool)))).tolist()
    return _subset(base, sorted(pool[i] for i in order[:size]))


def _source(dataset: Dataset) -> tuple[Dataset, list[int]]:
    """(the dataset under any Subsets and views, the indices into it that `dataset` holds)."""
    indices = list(range(len(dataset)))
    while True:
        if isinstance(dataset, Subset):
            indices = [dataset.indices[i] for i in indices]
            dataset = dataset.dataset
        elif hasattr(dataset, "base") and isinstance(getattr(dataset, "base"), Dataset):  # ViewDataset
            dataset = dataset.base
        else:
            return dataset, indices


def _sample_paths(dataset: Dataset) -> list[str] | None:
    """The file of every item (through Subsets), or None for datasets not read from files."""
    if isinstance(dataset, Subset):
        paths = _sample_paths(dataset.dataset)
        return None if paths is None else [paths[i] for i in dataset.indices]
    if isinstance(dataset, ImageFolderDataset):
        return [path for path, _ in dataset.samples]
    return None


def _check_disjoint(train: Dataset, test: Dataset) -> None:
    train_paths, test_paths = _sample_paths(train), _sample_paths(test)
    if train_paths is None or test_paths is None:
        return
    shared = set(train_paths).intersection(test_paths)
    if shared:
        raise RuntimeError(
            f"the train and test sets share {len(shared)} image files (e.g. {min(shared)}): evaluation would score "
            "images it trained on; give eval.test_split a folder of its own"
        )
