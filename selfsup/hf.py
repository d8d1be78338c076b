"""data.dataset=hf: images from Hugging Face `datasets` (a `save_to_disk` folder, local parquet files, or a Hub
dataset name, which `datasets` downloads into its cache) read item by item from memory-mapped Arrow.

Being map-style, it goes through the same EpochSampler and ViewDataset as an image folder, so a resumed run is
bit-identical and Accelerate splits every epoch across processes. The image column is read undecoded and
decoded here, so a corrupt image becomes a BrokenImageError that ViewDataset skips and counts.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

from PIL import Image
from torch.utils.data import Dataset

from selfsup.config import ConfigError
from selfsup.images import BrokenImageError, to_8bit

__all__ = ["HFImageDataset", "load_hf_dataset", "import_datasets"]

LABEL_NAMES = ("label", "labels", "class", "target")


def import_datasets():
    """The `datasets` module, imported only when data.dataset=hf."""
    try:
        import datasets
    except ImportError:
        raise ConfigError('data.dataset=hf needs the Hugging Face datasets library: pip install "selfsup[stream]"') from None
    return datasets


def _parquet_files(root: Path, split: str) -> list[str]:
    files = sorted(root.rglob("*.parquet"))
    named = [str(f) for f in files if f.name.startswith((f"{split}-", f"{split}.")) or f.parent.name == split]
    return named or ([str(f) for f in files] if split == "train" else [])  # unnamed files: all of them are train


def load_hf_dataset(root: str | os.PathLike | None, split: str = "train") -> "HFImageDataset":
    """`root`: a folder written by `Dataset(Dict).save_to_disk`, a folder of parquet files (`<split>-*.parquet`
    or `<split>/*.parquet`), or a Hub dataset name; `split` picks the split."""
    datasets = import_datasets()
    if root is None:
        raise ConfigError("data.dataset=hf needs data.root: a save_to_disk folder, a folder of parquet files, or a Hub name")
    path = Path(str(root)).expanduser()
    if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise ConfigError(f"{path} has no split {split!r} (it has {', '.join(loaded)}); set data.split")
            loaded = loaded[split]
    elif path.is_dir():
        files = _parquet_files(path, split)
        if not files:
            raise ConfigError(f"no parquet files for split {split!r} under {path} (looked for {split}-*.parquet, "
                              f"{split}/*.parquet); set data.split or data.root")
        loaded = datasets.load_dataset("parquet", data_files=files, split="train")
    elif str(root).startswith((".", "/", "~")):
        raise ConfigError(f"data.root={root!r} does not exist; point it at a save_to_disk or parquet folder")
    else:
        try:
            loaded = datasets.load_dataset(str(root), split=split)
        except Exception as e:  # network, unknown name, unknown split: one line naming the key
            raise ConfigError(f"cannot load Hugging Face dataset data.root={root!r} split {split!r}: "
                              f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    return HFImageDataset(loaded, name=str(root))


class HFImageDataset(Dataset):
    """`(PIL image, label)` items of a `datasets.Dataset`: its first Image column, and its ClassLabel column
    (else a column named label / labels / class / target; else -1)."""

    def __init__(self, table, name: str = "hf") -> None:
        datasets = import_datasets()
        features = table.features
        images = [c for c, f in features.items() if isinstance(f, datasets.Image)]
        if not images:
            raise ConfigError(f"{name} has no image column (its columns: {', '.join(features)}); "
                              "data.dataset=hf needs one of type datasets.Image")
        self.image_column = images[0]
        labels = [c for c, f in features.items() if isinstance(f, datasets.ClassLabel)]
        labels = labels or [c for c in LABEL_NAMES if c in features]
        self.label_column = labels[0] if labels else None
        label_feature = features.get(self.label_column) if self.label_column else None
        self.classes = list(label_feature.names) if isinstance(label_feature, datasets.ClassLabel) else None
        self.num_classes = len(self.classes) if self.classes else None
        columns = [self.image_column] + ([self.label_column] if self.label_column else [])
        self.table = table.select_columns(columns).cast_column(self.image_column, datasets.Image(decode=False))
        self.root = name

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        row = self.table[int(index)]
        stored = row[self.image_column] or {}
        source = stored.get("bytes") or stored.get("path")
        where = f"{self.root}[{index}]"
        try:
            if source is None:
                raise ValueError("empty image cell")
            with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
                image.load()
                image = to_8bit(image)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            raise BrokenImageError(where, e) from e
        label = row.get(self.label_column) if self.label_column else None
        return image, -1 if label is None else int(label)
