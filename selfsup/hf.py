"""data.dataset=hf: images from Hugging Face `datasets` (a `save_to_disk` folder, local parquet files, or a Hub
dataset name, which `datasets` downloads into its cache) read item by item from memory-mapped Arrow; or, when
data.root is a URL (hf://datasets/<owner>/<name>, https://, s3://, file://: any fsspec URL), its parquet files
streamed as shards (ParquetStream, at the end).

Being map-style, it goes through the same EpochSampler and ViewDataset as an image folder, so a resumed run is
bit-identical and Accelerate splits every epoch across processes. The image column is read undecoded and
decoded here, so a corrupt image becomes a BrokenImageError that ViewDataset skips and counts.
"""

from __future__ import annotations

import os
from pathlib import Path

from PIL import Image
from torch.utils.data import Dataset

from selfsup.config import ConfigError
from selfsup.images import BrokenImageError, load_image
from selfsup.streaming import ShardStream

__all__ = ["HFImageDataset", "ParquetStream", "load_hf_dataset", "import_datasets", "is_stream_root"]

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
    if is_stream_root(root):
        raise ConfigError(f"data.root={root!r} is a URL: hf data there is streamed and read by pretraining only; "
                          "evaluation needs a dataset read item by item: set eval.dataset and eval.root")
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
        self.image_column, self.label_column, self.classes = _columns(features, name, datasets)
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
        if source is None:
            raise BrokenImageError(where, ValueError("empty image cell"))
        image = load_image(source, where)
        label = row.get(self.label_column) if self.label_column else None
        return image, -1 if label is None else int(label)


# ---------------------------------------------------------------------------------------------
# Streaming: a URL root (hf://datasets/<owner>/<name>, https://, s3://, file://, any fsspec URL)
# ---------------------------------------------------------------------------------------------


def is_stream_root(root: str | os.PathLike | None) -> bool:
    """data.dataset=hf streams when data.root is a URL; a local folder or a bare Hub name is read item by item."""
    return root is not None and "://" in str(root)


def parquet_index(root: str, split: str):
    """The split's parquet files under the URL `root` as a ShardIndex (row counts from the files' footers),
    plus the image and label column names and the classes, from the features `datasets` stores in the schema."""
    import fsspec
    import pyarrow.parquet as pq

    from selfsup.shards import ShardIndex

    datasets = import_datasets()
    fs, path = fsspec.core.url_to_fs(str(root))
    files = sorted(fs.glob(f"{path.rstrip('/')}/**/*.parquet"))
    named = [f for f in files if Path(f).name.startswith((f"{split}-", f"{split}.")) or Path(f).parent.name == split]
    files = named or (files if split == "train" else [])
    if not files:
        raise ConfigError(f"no parquet files for split {split!r} under {root}; set data.split or data.root")
    lengths, schema = [], None
    for f in files:
        with fs.open(f, "rb") as handle:
            parquet = pq.ParquetFile(handle)
            lengths.append(parquet.metadata.num_rows)
            schema = schema or parquet.schema_arrow
    features = datasets.Features.from_arrow_schema(schema)
    image_column, label_column, classes = _columns(features, str(root), datasets)
    index = ShardIndex(tuple(fs.unstrip_protocol(f) for f in files), tuple(lengths),
                       len(classes) if classes else None, tuple(classes) if classes else None)
    return index, image_column, label_column


def _columns(features, name: str, datasets) -> tuple[str, str | None, list[str] | None]:
    images = [c for c, f in features.items() if isinstance(f, datasets.Image)]
    if not images:
        raise ConfigError(f"{name} has no image column (its columns: {', '.join(features)}); "
                          "data.dataset=hf needs one of type datasets.Image")
    labels = [c for c, f in features.items() if isinstance(f, datasets.ClassLabel)] or [c for c in LABEL_NAMES if c in features]
    label = labels[0] if labels else None
    classes = list(features[label].names) if label and isinstance(features[label], datasets.ClassLabel) else None
    return images[0], label, classes


class ParquetStream(ShardStream):
    """A ShardStream over a split's parquet files (data.dataset=hf with a URL data.root): exact epochs for any
    world size x workers and resume at a batch, as for tar shards (selfsup/streaming.py); rows read with pyarrow
    through fsspec, record batches before a resume point skipped undecoded."""

    def __init__(self, root: str, split: str, transform, seed: int = 0) -> None:
        index, self.image_column, self.label_column = parquet_index(root, split)
        super().__init__(index, transform, seed=seed)

    def _open(self, shard: int, skip: int):
        import fsspec
        import pyarrow.parquet as pq

        columns = [self.image_column] + ([self.label_column] if self.label_column else [])
        with fsspec.open(self.index.urls[shard], "rb") as handle:
            seen = 0
            for batch in pq.ParquetFile(handle).iter_batches(batch_size=256, columns=columns):
                if seen + batch.num_rows <= skip:
                    seen += batch.num_rows
                    continue
                for row in batch.to_pylist():
                    if seen >= skip:
                        yield row
                    seen += 1

    def _decode(self, sample, shard: int):
        if sample is None:
            raise BrokenImageError(f"{self.index.urls[shard]} (row missing)", RuntimeError("short parquet file"))
        cell = sample.get(self.image_column) or {}
        where = f"{self.index.urls[shard]}:{cell.get('path') or '?'}"
        if not cell.get("bytes"):
            raise BrokenImageError(where, ValueError("no image bytes in the row"))
        image = load_image(cell["bytes"], where)
        label = sample.get(self.label_column) if self.label_column else None
        return image, -1 if label is None else int(label)
