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
