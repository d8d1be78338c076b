"""Datasets that yield raw `(PIL.Image, label)` pairs; the views made from them are in sampling.py.

torchvision provides CIFAR-10/100 and STL-10. Written by hand because torchvision lacks them:
an image-folder reader that also accepts unlabeled folders, the Fashion-MNIST files that Debian ships
(dataset-fashion-mnist), and a synthetic dataset for tests. Decoding files is in images.py; evaluation's
train/test pairs in splits.py.
"""

from __future__ import annotations

import colorsys
import difflib
import operator
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image
from torch.utils.data import Dataset, Subset

from selfsup.config import ConfigError
from selfsup.images import BrokenImageError, load_image, read_idx, to_8bit  # noqa: F401  (re-exported)

__all__ = [
    "DATASETS",
    "IMAGE_EXTENSIONS",
    "FASHION_MNIST_SYSTEM_DIR",
    "DatasetInfo",
    "dataset_info",
    "build_dataset",
    "is_streamed",
    "load_image",
    "to_8bit",
    "read_idx",
    "ImageFolderDataset",
    "ArrayImageDataset",
    "SyntheticDataset",
]

DATASETS = ("image_folder", "cifar10", "cifar100", "stl10", "fashion_mnist", "synthetic", "webdataset", "hf")
STREAMED = ("webdataset",)  # read by pretraining as streams (selfsup/streaming.py), never item by item
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
_DEFAULT_ROOT = "data/"


@dataclass(frozen=True)
class DatasetInfo:
    """Facts the transforms and the encoder sidecar need before any image is read."""

    num_classes: int | None
    mean: tuple[float, ...]
    std: tuple[float, ...]
    image_size: int
    channels: int


_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_INFO = {
    "image_folder": DatasetInfo(None, _IMAGENET_MEAN, _IMAGENET_STD, 224, 3),
    "webdataset": DatasetInfo(None, _IMAGENET_MEAN, _IMAGENET_STD, 224, 3),
    "hf": DatasetInfo(None, _IMAGENET_MEAN, _IMAGENET_STD, 224, 3),
    "cifar10": DatasetInfo(10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), 32, 3),
    "cifar100": DatasetInfo(100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), 32, 3),
    "stl10": DatasetInfo(10, (0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713), 96, 3),
    # Grayscale: one channel; the transforms replicate it when the encoder wants 3.
    "fashion_mnist": DatasetInfo(10, (0.2860,), (0.3530,), 28, 1),
    # Measured on the default synthetic set (build_dataset defaults); only needs to be roughly right.
    "synthetic": DatasetInfo(10, (0.26, 0.26, 0.26), (0.21, 0.21, 0.21), 32, 3),
}


def _check_name(name: str) -> None:
    if name not in DATASETS:
        close = difflib.get_close_matches(name, DATASETS, n=3, cutoff=0.5)
        hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(f"unknown dataset {name!r}.{hint} Valid: {', '.join(DATASETS)}")


def is_streamed(name: str, root: str | os.PathLike | None) -> bool:
    """Read as a stream by pretraining (selfsup/streaming.py): webdataset shards, and hf data at a URL."""
    return name in STREAMED or (name == "hf" and root is not None and "://" in str(root))


def dataset_info(name: str) -> DatasetInfo:
    """Normalisation stats, class count and native size of a dataset, known without loading it."""
    _check_name(name)
    return _INFO[name]


def _check_split(name: str, split: str, valid: tuple[str, ...]) -> None:
    if split not in valid:
        raise ValueError(f"{name} has no split {split!r}; set data.split to one of {', '.join(valid)}")


def build_dataset(
    name: str,
    *,
    root: str | os.PathLike | None = None,
    split: str = "train",
    download: bool = False,
    subset: int | None = None,
    seed: int = 0,
    image_size: int = 32,
    num_samples: int = 512,
    num_classes: int = 10,
) -> Dataset:
    """Dataset of raw `(PIL.Image, label)` items (label -1 when unlabeled); transforms come later.

    `image_size`, `num_samples` and `num_classes` only shape the synthetic set. The result has a
    `num_classes` attribute (None when unknown or unlabeled).
    """
    _check_name(name)
    if name in STREAMED:
        raise ConfigError(f"{name} shards are streamed and read by pretraining only; evaluation needs a dataset read "
                          "item by item: set eval.dataset (and eval.root), e.g. the image folder the shards came from")
    if name == "image_folder":
        dataset = _image_folder(root, split)
    elif name == "hf":
        from selfsup.hf import load_hf_dataset

        dataset = load_hf_dataset(root, split)
    elif name == "fashion_mnist":
        dataset = _fashion_mnist(root, split, download)
    elif name in ("cifar10", "cifar100", "stl10"):
        dataset = _torchvision_dataset(name, root, split, download)
    else:
        dataset = SyntheticDataset(
            num_samples, image_size=image_size, num_classes=num_classes, seed=seed, split=split
        )
    if subset is not None:
        dataset = _fixed_subset(dataset, subset, seed)
    return dataset


def _fixed_subset(dataset: Dataset, size: int, seed: int, key: str = "data.subset") -> Subset:
    """The same `size` items for a given seed, for quick runs on a slice of a dataset; `key` is the
    config key that asked for it (named in the error)."""
    total = len(dataset)
    if not 0 < size <= total:
        raise ConfigError(
            f"{key}={size} must be between 1 and the size of the set it is drawn from ({total}); "
            f"set {key}={total} or null to use all of it"
        )
    generator = torch.Generator().manual_seed(_mix_seed(seed, total))
    indices = torch.randperm(total, generator=generator)[:size].sort().values.tolist()
    return _subset(dataset, indices)


def _subset(dataset: Dataset, indices: list[int]) -> Subset:
    """Subset that keeps the attributes callers read (num_classes, classes, root)."""
    sub = Subset(dataset, indices)
    sub.num_classes = getattr(dataset, "num_classes", None)
    for name in ("classes", "root"):
        if hasattr(dataset, name):
            setattr(sub, name, getattr(dataset, name))
    return sub


# ---------------------------------------------------------------------------------------------
# Image folder
# ---------------------------------------------------------------------------------------------


def _is_image(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _scan_images(directory: Path) -> list[str]:
    """All image files under `directory`, recursively, in a stable sorted order (hidden entries skipped)."""
    found = []
    for current, dirs, files in os.walk(directory, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found.extend(os.path.join(current, f) for f in files if _is_image(f))
    return sorted(found)


class ImageFolderDataset(Dataset):
    """Images under a directory: labelled by class sub-folder, or unlabeled (-1) without that structure.

    Labelled means: no images directly in `directory` and at least two sub-folders that hold images
    (labels follow the sorted folder names, as in torchvision's ImageFolder).
    """

    def __init__(self, directory: str | os.PathLike) -> None:
        directory = Path(directory)
        direct = sorted(str(p) for p in directory.iterdir() if p.is_file() and _is_image(p.name))
        subdirs = sorted(p for p in directory.iterdir() if p.is_dir() and not p.name.startswith("."))
        per_class = {d.name: files for d in subdirs if (files := _scan_images(d))}
        if not direct and len(per_class) >= 2:
            self.classes: list[str] | None = list(per_class)
            self.samples = [(f, label) for label, files in enumerate(per_class.values()) for f in files]
        else:
            self.classes = None
            nested = [f for files in per_class.values() for f in files]
            self.samples = [(f, -1) for f in sorted(direct + nested)]
        if not self.samples:
            raise FileNotFoundError(
                f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {directory}; "
                "point data.root at a folder of images (optionally one sub-folder per class)"
            )
        self.root = directory
        self._check_one_readable()
        self.num_classes = len(self.classes) if self.classes else None

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        path, label = self.samples[index]
        return load_image(path), label

    def _check_one_readable(self) -> None:
        """Fail at start, naming the folder, when not a single file decodes (usually the first one does)."""
        for path, _ in self.samples:
            try:
                load_image(path)
                return
            except BrokenImageError:
                continue
        raise BrokenImageError(
            self.root, RuntimeError(f"none of its {len(self.samples)} image files can be decoded; check data.root")
        )


def _image_folder(root: str | os.PathLike | None, split: str) -> ImageFolderDataset:
    return ImageFolderDataset(_image_folder_dir(root, split))


def _image_folder_dir(root: str | os.PathLike | None, split: str) -> Path:
    """`root/split` when it exists, `root` itself when it has no split folders at all."""
    if root is None:
        raise ValueError("image_folder needs a directory: set data.root=/path/to/images")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist; set data.root to a directory of images")
    split_dir = root / split
    if split_dir.is_dir():
        return split_dir
    present = [s for s in ("train", "val", "test") if (root / s).is_dir()]
    if present:
        raise FileNotFoundError(
            f"{split_dir} does not exist but {root} has split folders {present}; "
            "set data.split (eval.test_split for the test set) to one of them"
        )
    return root


# ---------------------------------------------------------------------------------------------
# Fashion-MNIST from IDX files
# ---------------------------------------------------------------------------------------------

# IDX format (LeCun et al., MNIST page): 2 zero bytes, a dtype code, the number of dimensions,
# then one big-endian uint32 per dimension, then the data in C order.
class ArrayImageDataset(Dataset):
    """Grayscale images held as one uint8 array [N, H, W] in memory; items are PIL "L" images."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, num_classes: int | None = None) -> None:
        if images.ndim != 3 or images.dtype != np.uint8:
            raise ValueError(f"expected uint8 images [N, H, W], got {images.dtype} {images.shape}")
        if labels.shape != (len(images),):
            raise ValueError(f"{len(images)} images but labels of shape {labels.shape}")
        self.images = images
        self.labels = labels.astype(np.int64)
        self.num_classes = num_classes

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        return Image.fromarray(self.images[index]), int(self.labels[index])


def _find_file(directories: list[Path], stem: str) -> Path | None:
    for directory in directories:
        for name in (stem, stem + ".gz"):
            if (directory / name).is_file():
                return directory / name
    return None


def _fashion_mnist(root: str | os.PathLike | None, split: str, download: bool) -> ArrayImageDataset:
    _check_split("fashion_mnist", split, ("train", "test"))
    prefix = "train" if split == "train" else "t10k"
    # torchvision keeps the same IDX files under <root>/FashionMNIST/raw.
    dirs = [Path(root), Path(root) / "FashionMNIST" / "raw"] if root is not None else [FASHION_MNIST_SYSTEM_DIR]
    images_file = _find_file(dirs, f"{prefix}-images-idx3-ubyte")
    labels_file = _find_file(dirs, f"{prefix}-labels-idx1-ubyte")
    if images_file is not None and labels_file is not None:
        images, labels = read_idx(images_file), read_idx(labels_file)
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(
                f"{images_file} {images.shape} and {labels_file} {labels.shape} do not form an image/label pair"
            )
        return ArrayImageDataset(images, labels, num_classes=10)
    try:
        tv = torchvision.datasets.FashionMNIST(root or _DEFAULT_ROOT, train=split == "train", download=download)
    except RuntimeError as err:
        raise FileNotFoundError(
            f"Fashion-MNIST not found (looked in {', '.join(map(str, dirs))}); "
            "apt-get install dataset-fashion-mnist, or set data.root to a folder with the IDX files, "
            "or set data.download=true"
        ) from err
    return ArrayImageDataset(tv.data.numpy(), tv.targets.numpy(), num_classes=10)


# ---------------------------------------------------------------------------------------------
# torchvision sets
# ---------------------------------------------------------------------------------------------


def _torchvision_dataset(name: str, root: str | os.PathLike | None, split: str, download: bool) -> Dataset:
    root = root or _DEFAULT_ROOT
    try:
        if name == "stl10":
            _check_split(name, split, ("train", "test", "unlabeled", "train+unlabeled"))
            dataset = torchvision.datasets.STL10(root, split=split, download=download)
        else:
            _check_split(name, split, ("train", "test"))
            cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
            dataset = cls(root, train=split == "train", download=download)
    except RuntimeError as err:
        raise FileNotFoundError(
            f"{name} not found under {root!r}; set data.root to the folder that holds it, "
            "or set data.download=true to fetch it"
        ) from err
    dataset.num_classes = None if split == "unlabeled" else _INFO[name].num_classes
    return dataset


# ---------------------------------------------------------------------------------------------
# Synthetic images
# ---------------------------------------------------------------------------------------------


class SyntheticDataset(Dataset):
    """Learnable toy images for tests, deterministic in (seed, split, index): the class sets hue,
    stripe orientation and frequency; each sample draws its phase, position, background and noise.
    """

    def __init__(
        self,
        num_samples: int = 512,
        *,
        image_size: int = 32,
        num_classes: int = 10,
        seed: int = 0,
        split: str = "train",
    ) -> None:
        if num_samples < 1 or num_classes < 1 or image_size < 4:
            raise ValueError("synthetic data needs num_samples >= 1, num_classes >= 1, image_size >= 4")
        self.num_samples = num_samples
        self.image_size = image_size
        self.num_classes = num_classes
        self.seed = seed
        self.split = split
        self._split_id = zlib.crc32(split.encode())
        grid = (np.arange(image_size) + 0.5) / image_size
        self._y, self._x = np.meshgrid(grid, grid, indexing="ij")  # [H, W] in (0, 1)

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        index = operator.index(index)
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} synthetic samples")
        label = index % self.num_classes
        rng = np.random.default_rng([self.seed, self._split_id, index])
        # Orientations in [0, 90] deg: a horizontal flip (angle -> 180 - angle) never maps one class
        # onto another, and orientation x frequency alone tell up to 16 classes apart without colour.
        angle = np.deg2rad(30.0 * (label % 4) + rng.normal(0.0, 3.0))
        cycles = (2.0 + 2.0 * ((label // 4) % 4)) * rng.uniform(0.9, 1.1)  # per image width
        phase = rng.uniform(0.0, 2.0 * np.pi)
        along = self._x * np.cos(angle) + self._y * np.sin(angle)
        stripes = 0.5 + 0.5 * np.sin(2.0 * np.pi * cycles * along + phase)  # [H, W]

        # Soft disk of stripes at a random place over a dark grey background.
        cx, cy = rng.uniform(0.35, 0.65, size=2)
        radius = rng.uniform(0.35, 0.5)
        distance = np.hypot(self._x - cx, self._y - cy)
        window = 1.0 / (1.0 + np.exp((distance - radius) / 0.03))

        hue = (label / self.num_classes + rng.normal(0.0, 0.01)) % 1.0
        colour = np.array(colorsys.hsv_to_rgb(hue, 0.75, 0.95))
        background = rng.uniform(0.05, 0.25)
        pattern = (0.2 + 0.8 * stripes)[..., None] * colour  # [H, W, 3]
        image = background * (1.0 - window[..., None]) + window[..., None] * pattern
        image = image + rng.normal(0.0, 0.03, size=image.shape)
        pixels = np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(pixels), label  # [H, W, 3] uint8 -> RGB


# ---------------------------------------------------------------------------------------------
# Seeds: one well-mixed seed per tuple (subsets here; views and batches in sampling.py, engine.py)
# ---------------------------------------------------------------------------------------------


def _mix_seed(*values: int) -> int:
    """Well-mixed 63-bit seed from a tuple of non-negative ints (NumPy's SeedSequence hashing)."""
    if any(v < 0 for v in values):
        raise ValueError(f"seeds, epochs and indices must be non-negative, got {values}")
    state = np.random.SeedSequence(list(values)).generate_state(1, dtype=np.uint64)[0]
    return int(state) & (2**63 - 1)
