"""Datasets (IDX, Fashion-MNIST, image folder, synthetic)."""

import gzip
import struct

import numpy as np
import pytest
from PIL import Image

from selfsup.data import (
    DATASETS,
    FASHION_MNIST_SYSTEM_DIR,
    build_dataset,
    dataset_info,
    read_idx,
)


def _write_idx(path, array: np.ndarray, dtype_code: int = 0x08, compress: bool = False) -> None:
    """Independent IDX writer: magic (0, 0, dtype, ndim), big-endian uint32 dims, C-order data."""
    payload = bytes([0, 0, dtype_code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    (gzip.open if compress else open)(path, "wb").write(payload)


@pytest.mark.parametrize("compress", [False, True])
def test_idx_pair_parses_to_arrays_and_dataset(tmp_path, compress):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(5, 28, 28), dtype=np.uint8)
    labels = np.array([3, 1, 4, 1, 5], dtype=np.uint8)
    ext = ".gz" if compress else ""
    _write_idx(tmp_path / f"t10k-images-idx3-ubyte{ext}", images, compress=compress)
    _write_idx(tmp_path / f"t10k-labels-idx1-ubyte{ext}", labels, compress=compress)

    np.testing.assert_array_equal(read_idx(tmp_path / f"t10k-images-idx3-ubyte{ext}"), images)
    dataset = build_dataset("fashion_mnist", root=tmp_path, split="test")
    assert len(dataset) == 5 and dataset.num_classes == 10
    for i in range(5):
        image, label = dataset[i]
        assert image.mode == "L" and image.size == (28, 28)
        np.testing.assert_array_equal(np.asarray(image), images[i])
        assert label == labels[i] and isinstance(label, int)


def test_idx_wider_dtype_is_big_endian(tmp_path):
    values = (np.arange(6).reshape(2, 3) * 70000).astype(">i4")  # big-endian, needs all 4 bytes
    _write_idx(tmp_path / "ints", values, dtype_code=0x0C)
    np.testing.assert_array_equal(read_idx(tmp_path / "ints"), values.astype(np.int32))


def test_idx_corrupt_files_raise_clear_errors(tmp_path):
    bad_magic = tmp_path / "train-images-idx3-ubyte"
    bad_magic.write_bytes(b"\x12\x34\x08\x03" + b"\x00" * 64)
    with pytest.raises(ValueError, match="bad magic number"):
        read_idx(bad_magic)
    truncated = tmp_path / "short"
    _write_idx(truncated, np.zeros((4, 28, 28), dtype=np.uint8))
    truncated.write_bytes(truncated.read_bytes()[:-10])
    with pytest.raises(ValueError, match="header"):
        read_idx(truncated)
    not_gzip = tmp_path / "x.gz"
    not_gzip.write_bytes(b"plain bytes")
    with pytest.raises(ValueError, match="gzip"):
        read_idx(not_gzip)


def test_fashion_mnist_missing_names_the_fixes(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        build_dataset("fashion_mnist", root=tmp_path)
    message = str(info.value)
    assert "apt-get install dataset-fashion-mnist" in message and "data.root" in message and "data.download" in message


@pytest.mark.skipif(not FASHION_MNIST_SYSTEM_DIR.is_dir(), reason="apt package dataset-fashion-mnist not installed")
def test_real_fashion_mnist_from_system_package():
    train, test = build_dataset("fashion_mnist"), build_dataset("fashion_mnist", split="test")
    assert (len(train), len(test)) == (60000, 10000)
    np.testing.assert_array_equal(np.bincount(test.labels), np.full(10, 1000))  # balanced test set
    assert set(np.unique(train.labels)) == set(range(10))
    image, label = train[0]
    assert image.mode == "L" and image.size == (28, 28) and 0 <= label <= 9
    # The published normalisation stats describe these pixels.
    info = dataset_info("fashion_mnist")
    pixels = test.images / 255.0
    assert abs(pixels.mean() - info.mean[0]) < 0.01 and abs(pixels.std() - info.std[0]) < 0.01


def _png(path, colour, mode="RGB", size=(6, 5)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour).save(path)


def test_image_folder_labelled_by_sorted_class_folders(tmp_path):
    _png(tmp_path / "train" / "dog" / "a.png", (0, 0, 255))
    _png(tmp_path / "train" / "cat" / "b.PNG", (255, 0, 0))
    _png(tmp_path / "train" / "cat" / "nested" / "c.jpg", (250, 0, 0))
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")
    _png(tmp_path / "val" / "cat" / "d.png", (255, 0, 0))
    _png(tmp_path / "val" / "dog" / "e.png", 30, mode="L")

    train = build_dataset("image_folder", root=tmp_path)
    assert train.classes == ["cat", "dog"] and train.num_classes == 2 and len(train) == 3
    labels = [train[i][1] for i in range(3)]
    assert labels == [0, 0, 1]
    reds = [np.asarray(train[i][0])[0, 0, 0] for i in range(3)]
    assert reds[0] > 200 and reds[1] > 200 and reds[2] == 0  # cat images red, dog blue

    val = build_dataset("image_folder", root=tmp_path, split="val")
    assert [val[i][1] for i in range(2)] == [0, 1]
    assert val[1][0].mode == "L"  # mode left to the transforms

    with pytest.raises(FileNotFoundError, match="split"):
        build_dataset("image_folder", root=tmp_path, split="test")


def test_image_folder_unlabelled(tmp_path):
    _png(tmp_path / "x.png", (1, 2, 3))
    _png(tmp_path / "sub" / "y.webp", (4, 5, 6))
    _png(tmp_path / ".hidden" / "z.png", (7, 8, 9))
    dataset = build_dataset("image_folder", root=tmp_path)
    assert dataset.num_classes is None and len(dataset) == 2
    assert {dataset[i][1] for i in range(2)} == {-1}
    # One folder of images is not a class structure either.
    only = tmp_path / "only"
    _png(only / "images" / "a.png", (0, 0, 0))
    _png(only / "images" / "b.png", (0, 0, 0))
    single = build_dataset("image_folder", root=only)
    assert single.num_classes is None and [single[i][1] for i in range(2)] == [-1, -1]


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.root") as info:
        build_dataset("image_folder", root=tmp_path / "missing")
    assert str(tmp_path / "missing") in str(info.value)
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no images") as info:
        build_dataset("image_folder", root=tmp_path / "empty")
    assert str(tmp_path / "empty") in str(info.value)
    with pytest.raises(ValueError, match="data.root"):
        build_dataset("image_folder")


def test_torchvision_sets_missing_name_the_fix(tmp_path):
    for name in ("cifar10", "stl10"):
        with pytest.raises(FileNotFoundError, match="data.download=true"):
            build_dataset(name, root=tmp_path)
    with pytest.raises(ValueError, match="unlabeled"):
        build_dataset("cifar10", root=tmp_path, split="unlabeled")


def test_unknown_dataset_suggests():
    with pytest.raises(ValueError, match="fashion_mnist"):
        build_dataset("fashion-mnist")
    with pytest.raises(ValueError, match="cifar10"):
        dataset_info("cifar")
    for name in DATASETS:
        info = dataset_info(name)
        assert len(info.mean) == len(info.std) == info.channels


def _pixels(dataset):
    return np.stack([np.asarray(dataset[i][0], dtype=np.float32) / 255 for i in range(len(dataset))])


def test_synthetic_deterministic_and_split_dependent():
    a = build_dataset("synthetic", num_samples=20, image_size=16, seed=3)
    b = build_dataset("synthetic", num_samples=20, image_size=16, seed=3)
    np.testing.assert_array_equal(_pixels(a), _pixels(b))
    assert a[5][0].mode == "RGB" and a[5][0].size == (16, 16)
    assert [a[i][1] for i in range(20)] == [i % 10 for i in range(20)]
    other_seed = build_dataset("synthetic", num_samples=20, image_size=16, seed=4)
    other_split = build_dataset("synthetic", num_samples=20, image_size=16, seed=3, split="test")
    assert not np.array_equal(_pixels(a), _pixels(other_seed))
    assert not np.array_equal(_pixels(a), _pixels(other_split))


def _nearest_mean_accuracy(train_x, train_y, test_x, test_y, num_classes):
    means = np.stack([train_x[train_y == c].mean(0) for c in range(num_classes)])
    distances = ((test_x[:, None, :] - means[None]) ** 2).sum(-1)  # [N, K]
    return (distances.argmin(1) == test_y).mean()


def test_synthetic_classes_are_separable():
    train = build_dataset("synthetic", num_samples=300, image_size=32, split="train")
    test = build_dataset("synthetic", num_samples=100, image_size=32, split="test")
    train_x, test_x = _pixels(train), _pixels(test)
    train_y = np.array([train[i][1] for i in range(len(train))])
    test_y = np.array([test[i][1] for i in range(len(test))])
    # Raw pixels (mostly colour): far above the 10% chance level.
    accuracy = _nearest_mean_accuracy(train_x.reshape(300, -1), train_y, test_x.reshape(100, -1), test_y, 10)
    assert accuracy > 0.5
    # Without colour or phase: the grey-level Fourier magnitude (orientation x frequency) separates too.
    def spectrum(x):
        return np.abs(np.fft.fft2(x.mean(-1) - x.mean(-1).mean((1, 2), keepdims=True))).reshape(len(x), -1)
    assert _nearest_mean_accuracy(spectrum(train_x), train_y, spectrum(test_x), test_y, 10) > 0.9


def test_subset_is_fixed_and_keeps_attributes():
    full = build_dataset("synthetic", num_samples=50, image_size=8)
    sub = build_dataset("synthetic", num_samples=50, image_size=8, subset=12)
    again = build_dataset("synthetic", num_samples=50, image_size=8, subset=12)
    assert len(sub) == 12 and sub.indices == again.indices and len(set(sub.indices)) == 12
    assert sub.num_classes == 10
    np.testing.assert_array_equal(np.asarray(sub[3][0]), np.asarray(full[sub.indices[3]][0]))
    assert build_dataset("synthetic", num_samples=50, image_size=8, subset=12, seed=1).indices != sub.indices
    with pytest.raises(ValueError, match="subset"):
        build_dataset("synthetic", num_samples=50, subset=51)


def test_16bit_png_is_scaled_to_8bit_not_clipped(tmp_path):
    """A 16-bit gradient PNG read through the folder dataset and the eval transform: value / 257 per pixel
    (before: PIL's convert clipped it, 99.6 % of the pixels came out white)."""
    from selfsup.transforms import build_eval_transform

    gradient = (np.arange(32 * 32, dtype=np.uint32).reshape(32, 32) * 64).astype(np.uint16)  # 0 .. 65472
    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        Image.fromarray(gradient).save(tmp_path / cls / "g.png")
    assert Image.open(tmp_path / "a" / "g.png").mode.startswith("I")  # really stored and read as 16-bit
    expected = np.floor(gradient.astype(np.float64) / 257 + 0.5).astype(np.uint8)  # round half up: k * 257 -> k

    dataset = build_dataset("image_folder", root=tmp_path)
    image, _ = dataset[0]
    assert image.mode == "L"
    np.testing.assert_array_equal(np.asarray(image), expected)
    assert expected.max() == 255 and (expected == 255).mean() < 0.01  # a gradient, not a white sheet
    # what the encoder sees: the eval transform at the image's own size, unnormalised
    tensor = build_eval_transform(image_size=32, mean=(0.0,), std=(1.0,), in_chans=1)(image)
    np.testing.assert_allclose(tensor[0].numpy() * 255, expected, atol=1e-3)


def test_images_of_every_mode_become_8bit_with_the_expected_values(tmp_path):
    from selfsup.data import load_image, to_8bit

    # 32-bit int within 16 bits (older Pillow reads 16-bit PNGs as "I"), and beyond (own range)
    ints = Image.fromarray(np.array([[0, 257, 65535]], dtype=np.int32))
    assert ints.mode == "I" and np.asarray(to_8bit(ints)).tolist() == [[0, 1, 255]]
    wide = Image.fromarray(np.array([[-100, 0, 300]], dtype=np.int32))
    assert np.asarray(to_8bit(wide)).tolist() == [[0, 64, 255]]  # 100 / 400 x 255 = 63.75
    floats = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert floats.mode == "F" and np.asarray(to_8bit(floats)).tolist() == [[0, 128, 255]]
    big_floats = Image.fromarray(np.array([[2.0, 3.0, 6.0]], dtype=np.float32))
    assert np.asarray(to_8bit(big_floats)).tolist() == [[0, 64, 255]]

    # through files: 1-bit, palette with a transparent index, grey + alpha, CMYK
    bits = Image.fromarray(np.array([[True, False]]))
    bits.save(tmp_path / "bits.png")
    loaded = load_image(tmp_path / "bits.png")
    assert loaded.mode == "L" and np.asarray(loaded).tolist() == [[255, 0]]

    palette = Image.new("P", (2, 1))
    palette.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    palette.putpixel((0, 0), 0)
    palette.putpixel((1, 0), 1)
    palette.info["transparency"] = 0
    palette.save(tmp_path / "palette.png", transparency=0)
    loaded = load_image(tmp_path / "palette.png")
    assert loaded.mode == "RGBA" and np.asarray(loaded).tolist() == [[[10, 20, 30, 0], [200, 100, 50, 255]]]

    grey_alpha = Image.fromarray(np.array([[[40, 0], [90, 255]]], dtype=np.uint8), mode="LA")
    grey_alpha.save(tmp_path / "la.png")
    loaded = load_image(tmp_path / "la.png")
    assert loaded.mode == "LA" and np.asarray(loaded).tolist() == [[[40, 0], [90, 255]]]

    cmyk = Image.new("CMYK", (3, 1))
    for x, ink in enumerate([(0, 0, 0, 0), (255, 0, 0, 0), (0, 0, 0, 255)]):  # white, cyan, black
        cmyk.putpixel((x, 0), ink)
    cmyk.save(tmp_path / "cmyk.tif")
    loaded = load_image(tmp_path / "cmyk.tif")
    assert loaded.mode == "RGB" and np.asarray(loaded).tolist() == [[[255, 255, 255], [0, 255, 255], [0, 0, 0]]]
