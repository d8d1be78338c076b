"""Webdataset tar shards: writing them from an image folder, and the index of sample counts read beside them.

The index is timm's `_info.json` (`splits.<split>.filenames / shard_lengths / num_samples`), so timm's own
webdataset reader takes our shards too; we add `num_classes` and `classes`. Writing uses webdataset's
ShardWriter; the file bytes are stored as they are (no re-encoding), so a round trip gives the same pixels.
Sample counts per shard are what makes an epoch exact (selfsup/streaming.py): a stream cannot be split into
equal parts without knowing them.
"""

from __future__ import annotations

import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from selfsup.config import ConfigError

__all__ = ["ShardIndex", "INDEX_FILE", "read_index", "index_shards", "write_shards", "import_webdataset"]

INDEX_FILE = "_info.json"


def import_webdataset():
    """The webdataset module, imported only when shards are read or written."""
    try:
        import webdataset
    except ImportError:
        raise ConfigError('data.dataset=webdataset needs the webdataset library: pip install "selfsup[stream]"') from None
    return webdataset


@dataclass(frozen=True)
class ShardIndex:
    """The shards of one split, in index order, and how many samples each holds."""

    urls: tuple[str, ...]
    lengths: tuple[int, ...]
    num_classes: int | None = None
    classes: tuple[str, ...] | None = None

    @property
    def num_samples(self) -> int:
        return sum(self.lengths)


def _join(root: str, name: str) -> str:
    if "://" in name or name.startswith(("/", "pipe:")):
        return name
    return f"{root.rstrip('/')}/{name}" if "://" in root else str(Path(root) / name)


def read_index(root: str | os.PathLike, split: str = "train") -> ShardIndex:
    """The split's shards from `root/_info.json`; a local folder without one is counted (tar headers only)."""
    root = str(root)
    local = "://" not in root and not root.startswith("pipe:")
    if local and not Path(root).is_dir():
        raise ConfigError(f"data.root={root!r} is not a directory of webdataset shards; write them with "
                          "tools/make_shards.py SRC_DIR OUT_DIR --shard-size N")
    if local and not (Path(root) / INDEX_FILE).is_file():
        info = index_shards(root, write=False)
    else:
        wds = import_webdataset()
        try:
            with wds.gopen(_join(root, INDEX_FILE)) as f:
                info = json.load(f)
        except Exception as e:
            raise ConfigError(f"cannot read {_join(root, INDEX_FILE)} ({e}); a remote shard set needs its index: "
                              "run tools/make_shards.py --index-only on a copy of the shards and upload the file") from None
    splits = info.get("splits", {})
    if split not in splits:
        raise ConfigError(f"{root} has no split {split!r} (it has {', '.join(splits) or 'none'}); set data.split to one of them")
    entry = splits[split]
    lengths = tuple(int(n) for n in entry["shard_lengths"])
    if not lengths or len(lengths) != len(entry["filenames"]):
        raise ConfigError(f"{root}/{INDEX_FILE}: split {split!r} lists {len(entry['filenames'])} shards but "
                          f"{len(lengths)} shard lengths; rewrite it with tools/make_shards.py --index-only {root}")
    classes = info.get("classes")
    return ShardIndex(tuple(_join(root, f) for f in entry["filenames"]), lengths,
                      info.get("num_classes"), tuple(classes) if classes else None)


def _count_samples(path: Path) -> int:
    """Samples in one tar: runs of members sharing a key (the name up to the first dot of its base name)."""
    count, last = 0, None
    with tarfile.open(path, "r:*") as tar:
        for member in tar:  # headers only: the data of an uncompressed tar is seeked over
            if not member.isreg():
                continue
            directory, base = os.path.split(member.name)
            key = os.path.join(directory, base.split(".", 1)[0])
            if key != last:
                count, last = count + 1, key
    return count


def index_shards(root: str | os.PathLike, *, write: bool = True) -> dict:
    """Count the samples of every `<split>-*.tar` under `root` (split `train` for other names) and, with
    `write`, save the result as `root/_info.json`."""
    root = Path(root)
    tars = sorted(p for p in root.iterdir() if p.suffix == ".tar" and not p.name.startswith("."))
    if not tars:
        raise ConfigError(f"no .tar shards in {root}; write them with tools/make_shards.py SRC_DIR {root} --shard-size N")
    old = json.loads((root / INDEX_FILE).read_text()) if (root / INDEX_FILE).is_file() else {}
    splits: dict[str, dict] = {}
    for tar in tars:
        split = tar.name.rsplit("-", 1)[0] if "-" in tar.name else "train"
        entry = splits.setdefault(split, {"name": split, "num_samples": 0, "filenames": [], "shard_lengths": []})
        n = _count_samples(tar)
        entry["filenames"].append(tar.name)
        entry["shard_lengths"].append(n)
        entry["num_samples"] += n
    info = {"name": old.get("name", root.name), "num_classes": old.get("num_classes"),
            "classes": old.get("classes"), "splits": splits}
    if write:
        (root / INDEX_FILE).write_text(json.dumps(info, indent=1))
    return info


def write_shards(src: str | os.PathLike, out: str | os.PathLike, shard_size: int, *, seed: int = 0,
                 verbose: bool = False) -> dict:
    """Shards of `shard_size` samples from an image folder (its train/test/val split folders each become a
    split, else the whole folder is `train`); labelled folders store the class index as `.cls`.

    Samples are written in an order shuffled by `seed`: a class-sorted folder would otherwise give shards of
    one class each. Returns the index written to `out/_info.json`."""
    from selfsup.data import ImageFolderDataset

    if shard_size < 1:
        raise ConfigError(f"--shard-size must be >= 1, got {shard_size}")
    wds = import_webdataset()
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise ConfigError(f"{src} is not a directory of images")
    out.mkdir(parents=True, exist_ok=True)
    present = [s for s in ("train", "val", "test") if (src / s).is_dir()]
    folders = {s: src / s for s in present} or {"train": src}
    info: dict = {"name": src.name, "num_classes": None, "classes": None, "splits": {}}
    for split, folder in folders.items():
        dataset = ImageFolderDataset(folder)
        if dataset.classes is not None:
            if info["classes"] not in (None, dataset.classes):
                raise ConfigError(f"{folder} has classes {dataset.classes}, other splits {info['classes']}")
            info["classes"], info["num_classes"] = dataset.classes, len(dataset.classes)
        order = np.random.default_rng([seed, len(dataset)]).permutation(len(dataset))
        entry = {"name": split, "num_samples": len(dataset), "filenames": [], "shard_lengths": []}
        with wds.ShardWriter(str(out / f"{split}-%06d.tar"), maxcount=shard_size, verbose=int(verbose)) as sink:
            for number, i in enumerate(order):
                path, label = dataset.samples[i]
                extension = Path(path).suffix.lower().lstrip(".").replace("jpeg", "jpg")
                sample = {"__key__": f"{number:08d}", extension: Path(path).read_bytes()}
                if label >= 0:
                    sample["cls"] = str(label).encode()
                sink.write(sample)
        written = sorted(out.glob(f"{split}-*.tar"))
        entry["filenames"] = [p.name for p in written]
        entry["shard_lengths"] = [min(shard_size, len(dataset) - k * shard_size) for k in range(len(written))]
        info["splits"][split] = entry
    (out / INDEX_FILE).write_text(json.dumps(info, indent=1))
    return info
