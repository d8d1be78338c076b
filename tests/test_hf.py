"""data.dataset=hf: save_to_disk folders and parquet files read item by item, labels and classes found,
corrupt images skipped and counted, clear errors; pretraining builds its loader from it."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from selfsup.builders import build_pretraining
from selfsup.config import ConfigError, from_dict
from selfsup.engine import make_loader
from selfsup.sampling import ViewDataset
from tests.conftest import tiny_config_dict

datasets = pytest.importorskip("datasets")


def png(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((8, 8), value, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def table(n: int, offset: int = 0, broken: tuple[int, ...] = ()):
    features = datasets.Features({"img": datasets.Image(), "fine": datasets.ClassLabel(names=["a", "b", "c"]),
                                  "note": datasets.Value("string")})
    images = [{"bytes": b"junk" if i in broken else png(offset + i), "path": None} for i in range(n)]
    return datasets.Dataset.from_dict({"img": images, "fine": [i % 3 for i in range(n)], "note": ["x"] * n},
                                      features=features)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    datasets.DatasetDict({"train": table(10, broken=(4,)), "test": table(4, offset=100)}).save_to_disk(str(root / "disk"))
    (root / "pq").mkdir()
    table(6).to_parquet(str(root / "pq" / "train-00000.parquet"))
    table(3, offset=50).to_parquet(str(root / "pq" / "test-00000.parquet"))
    return root


def test_save_to_disk_and_parquet_folders_give_images_labels_and_classes(saved):
    from selfsup.data import build_dataset

    disk = build_dataset("hf", root=saved / "disk", split="test")
    assert len(disk) == 4 and disk.classes == ["a", "b", "c"] and disk.num_classes == 3
    image, label = disk[2]
    assert image.mode == "L" and image.getpixel((0, 0)) == 102 and label == 2
    parquet = build_dataset("hf", root=saved / "pq", split="test")
    assert [parquet[i][0].getpixel((0, 0)) for i in range(3)] == [50, 51, 52]
    assert len(build_dataset("hf", root=saved / "pq", split="train")) == 6


def test_a_corrupt_image_is_skipped_and_counted(saved):
    from selfsup.data import build_dataset

    views = ViewDataset(build_dataset("hf", root=saved / "disk"), lambda im: torch.tensor(im.getpixel((0, 0))))
    with pytest.warns(UserWarning, match="unreadable"):
        values = [int(views[(0, i)][0]) for i in range(10)]
    assert values == [0, 1, 2, 3, 5, 5, 6, 7, 8, 9] and views.broken_images == 1  # the next readable one stands in


def test_clear_errors_for_a_wrong_split_or_root(saved, tmp_path):
    from selfsup.data import build_dataset

    with pytest.raises(ConfigError, match="no split 'val'"):
        build_dataset("hf", root=saved / "disk", split="val")
    with pytest.raises(ConfigError, match="no parquet files for split 'val'"):
        build_dataset("hf", root=saved / "pq", split="val")
    with pytest.raises(ConfigError, match="does not exist"):
        build_dataset("hf", root=str(tmp_path / "nothing"))


def test_pretraining_reads_it_through_the_epoch_sampler(saved, tmp_path):
    cfg = from_dict(tiny_config_dict(tmp_path, data={"dataset": "hf", "root": str(saved / "disk"), "batch_size": 4,
                                                     "image_size": 8}))
    _, train_set, _ = build_pretraining(cfg)
    batch, labels = next(iter(make_loader(train_set, cfg.data, seed=0)))
    assert len(batch) == 2 and batch[0].shape == (4, 3, 8, 8) and labels.shape == (4,)


# -- streaming: a URL data.root -------------------------------------------------------------------


def number(image) -> torch.Tensor:
    return torch.tensor(image.getpixel((0, 0)))


def seen(stream, workers: int, epoch: int = 0, start: int = 0) -> list[list[int]]:
    from torch.utils.data import DataLoader

    stream.set_position(epoch, start)
    return [b[0].tolist() for b in DataLoader(stream, batch_size=stream.batch_size, num_workers=workers)]


@pytest.fixture(scope="module")
def parquet_url(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream")
    offset = 0
    for k, n in enumerate((5, 4, 3)):  # 12 rows in 3 uneven files; row i holds image number i
        table(n, offset=offset).to_parquet(str(root / f"train-{k:05d}.parquet"))
        offset += n
    return f"file://{root}"


def test_a_url_root_streams_its_parquet_files_exactly_once_per_epoch(parquet_url):
    from selfsup.hf import ParquetStream

    assert ParquetStream(parquet_url, "train", number).index.lengths == (5, 4, 3)
    for world in (1, 2):
        orders = []
        for workers in (0, 2):
            batches = []
            for rank in range(world):
                batches += seen(ParquetStream(parquet_url, "train", number, seed=2).configure(3, rank, world), workers)
            orders.append(batches)
            assert sorted(n for b in batches for n in b) == list(range(12))
        assert orders[0] == orders[1]
    whole = seen(ParquetStream(parquet_url, "train", number, seed=2).configure(3), 0, epoch=1)
    assert seen(ParquetStream(parquet_url, "train", number, seed=2).configure(3), 2, epoch=1, start=2) == whole[2:]


def test_pretraining_streams_a_url_root_and_evaluation_asks_for_eval_dataset(parquet_url, tmp_path):
    from selfsup.data import build_dataset
    from selfsup.hf import ParquetStream

    cfg = from_dict(tiny_config_dict(tmp_path, data={"dataset": "hf", "root": parquet_url, "batch_size": 4, "image_size": 8}))
    _, train_set, _ = build_pretraining(cfg)
    assert isinstance(train_set, ParquetStream)
    batch, labels = next(iter(make_loader(train_set, cfg.data, seed=0)))
    assert batch[0].shape == (4, 3, 8, 8) and labels.shape == (4,)
    with pytest.raises(ConfigError, match="eval.dataset"):
        build_dataset("hf", root=parquet_url)
