"""An image_folder without train/ and test/ sub-folders: evaluation holds out a fixed, stratified part
of it and never scores an image it trained on (issue 14)."""

from __future__ import annotations

import importlib.util
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from torch.utils.data import Subset

from selfsup.builders import build_labelled_pair
from selfsup.config import ConfigError, load_config
from selfsup import splits
from selfsup.data import ImageFolderDataset
from selfsup.splits import build_train_test
from selfsup.evaluation import KNNMonitor
from selfsup.transfer import ToolRun, labelled_sets
from tests.conftest import ROOT

CLASSES, PER_CLASS = 4, 50


@pytest.fixture(scope="module")
def noise_folder(tmp_path_factory) -> Path:
    """4 class folders x 50 PNGs of uniform noise: the labels carry no information, chance is 25 %."""
    root = tmp_path_factory.mktemp("noise")
    rng = np.random.default_rng(0)
    for label in range(CLASSES):
        (root / f"class_{label}").mkdir()
        for i in range(PER_CLASS):
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / f"class_{label}" / f"{i}.png")
    return root


def paths_and_labels(dataset) -> list[tuple[str, int]]:
    """(file, label) of every item, read here through the Subset chain down to the folder's sample list."""
    dataset = getattr(dataset, "base", dataset)  # ViewDataset -> raw
    indices = list(range(len(dataset)))
    while isinstance(dataset, Subset):
        indices = [dataset.indices[i] for i in indices]
        dataset = dataset.dataset
    assert isinstance(dataset, ImageFolderDataset)
    return [dataset.samples[i] for i in indices]


def tool_run(root: Path, tmp_path: Path, *overrides: str) -> ToolRun:
    """What tools/*.py hand to labelled_sets, with the monitor's default caps (eval.max_test_samples=2000)."""
    cfg = load_config(None, ["data.dataset=image_folder", f"data.root={root}", "data.image_size=16", *overrides])
    return ToolRun(cfg, encoder=None, meta={}, in_chans=3, run_dir=tmp_path / "run", encoder_spec="pixels")


def test_monitor_knn_on_noise_is_at_chance_not_memorised(noise_folder):
    """Before the fix train = test = the whole folder and each test image found itself: 100 % top-1."""
    train, test = build_labelled_pair("image_folder", root=str(noise_folder), image_size=16, in_chans=3)
    assert (len(train), len(test)) == (CLASSES * PER_CLASS * 4 // 5, CLASSES * PER_CLASS // 5)
    top1 = KNNMonitor(train, test, k=5, temperature=0.1, batch_size=64).pixels()["knn_top1"]
    assert top1 <= 50.0, top1  # chance 25 % on 40 test images (P(>= 50 %) ~ 1e-4); memorised it was 100 %


def test_knn_tool_on_noise_is_at_chance_not_memorised(noise_folder, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("tool_knn_holdout", ROOT / "tools" / "knn.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.main(["--encoder", "pixels", "--dataset", "image_folder", "--root", str(noise_folder),
                          "--image-size", "16", "--k", "5", f"train.output_dir={tmp_path / 'runs'}", "data.num_workers=0"])
    assert result["test_size"] == 40 and result["train_size"] == 160
    assert result["top1"] <= 50.0, result


def test_holdout_is_stratified_disjoint_and_fixed_by_its_seed(noise_folder, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(splits, "_ANNOUNCED_HOLDOUTS", set())  # earlier tests announced this folder already
    train, test, classes = labelled_sets(tool_run(noise_folder, tmp_path), augment=False)
    assert classes == CLASSES
    train_items, test_items = paths_and_labels(train), paths_and_labels(test)
    assert not {p for p, _ in train_items} & {p for p, _ in test_items}
    assert len(train_items) + len(test_items) == CLASSES * PER_CLASS  # nothing lost
    assert Counter(label for _, label in test_items) == {c: 10 for c in range(CLASSES)}  # 20 % of each class
    # each item's label is its class folder
    assert all(Path(p).parent.name == f"class_{label}" for p, label in train_items + test_items)
    out = capsys.readouterr().out
    assert "holding out 20 % (40 images, stratified, seed 0)" in out

    again = paths_and_labels(labelled_sets(tool_run(noise_folder, tmp_path), augment=False)[1])
    assert again == test_items  # same seed, same split
    assert "holding out" not in capsys.readouterr().out  # said once
    other = paths_and_labels(labelled_sets(tool_run(noise_folder, tmp_path, "eval.holdout_seed=1"), augment=False)[1])
    assert other != test_items and Counter(label for _, label in other) == {c: 10 for c in range(CLASSES)}
    # train.seed does not move the held-out images (runs with different seeds score the same ones)
    assert paths_and_labels(labelled_sets(tool_run(noise_folder, tmp_path, "train.seed=7"), augment=False)[1]) == test_items

    half = paths_and_labels(labelled_sets(tool_run(noise_folder, tmp_path, "eval.holdout_fraction=0.5"), augment=False)[1])
    assert Counter(label for _, label in half) == {c: 25 for c in range(CLASSES)}
    # the caps draw from each part, never across
    capped_train, capped_test = build_train_test("image_folder", root=noise_folder, max_train=40, max_test=8)
    assert len(capped_train) == 40 and len(capped_test) == 8
    assert {p for p, _ in paths_and_labels(capped_test)} <= {p for p, _ in test_items}


def test_real_split_folders_are_used_as_they_are(tmp_path):
    for split, count in (("train", 3), ("test", 2)):
        for label in range(2):
            (tmp_path / split / f"c{label}").mkdir(parents=True)
            for i in range(count):
                Image.new("RGB", (8, 8), (i, label, 0)).save(tmp_path / split / f"c{label}" / f"{i}.png")
    train, test = build_train_test("image_folder", root=tmp_path)
    assert len(train) == 6 and len(test) == 4 and isinstance(train, ImageFolderDataset)
    # train/ alone: its own held-out part, one image of each class (round(0.2 x 3) = 1)
    shutil.rmtree(tmp_path / "test")
    train, test = build_train_test("image_folder", root=tmp_path)
    assert (len(train), len(test)) == (4, 2) and sorted(label for _, label in paths_and_labels(test)) == [0, 1]
    assert all("/train/" in path for path, _ in paths_and_labels(test))
    # another split folder next to train/: the test split is named, not guessed
    (tmp_path / "val").mkdir()
    with pytest.raises(FileNotFoundError, match="eval.test_split"):
        build_train_test("image_folder", root=tmp_path)


def test_too_few_images_per_class_is_a_one_line_error(tmp_path):
    for label, count in (("a", 3), ("b", 1)):
        (tmp_path / label).mkdir()
        for i in range(count):
            Image.new("RGB", (8, 8)).save(tmp_path / label / f"{i}.png")
    with pytest.raises(ConfigError, match="eval.holdout_fraction") as info:
        build_train_test("image_folder", root=tmp_path)
    message = str(info.value)
    assert "'b'" in message and "\n" not in message and "train/ and test/" in message
    with pytest.raises(ConfigError, match="eval.holdout_fraction"):
        load_config(None, ["eval.holdout_fraction=1.0"])


def test_eval_caps_are_maxima_and_errors_name_their_own_key(noise_folder):
    """The caps were reported as data.subset (and a 2000-image default failed on any smaller test set)."""
    train, test = build_labelled_pair("image_folder", root=str(noise_folder), image_size=16, in_chans=3,
                                      max_train=10000, max_test=2000)
    assert (len(train), len(test)) == (160, 40)
    for kwargs, key in (({"max_train": 0}, "eval.max_train_samples"), ({"max_test": -1}, "eval.max_test_samples")):
        with pytest.raises(ConfigError, match=key) as info:
            build_labelled_pair("synthetic", root=None, image_size=8, in_chans=3, num_samples=32, **kwargs)
        assert "data.subset" not in str(info.value)
