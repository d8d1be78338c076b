"""View presets and eval transform, checked against independent formulations and invariants."""

import numpy as np
import pytest
import torch
from PIL import Image

from selfsup.transforms import VIEW_OPTIONS, VIEW_PRESETS, build_eval_transform, build_views

MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
# Every colour op off, full-image crop: the view should be the eval transform of the image.
PLAIN = dict(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_p=0.0, jitter_p=0.0, grayscale_p=0.0,
             blur_p=0.0, solarize_p=0.0)


def _random_image(size=(40, 40), mode="RGB", seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels).convert(mode)


def _unnormalize(x: torch.Tensor, mean=MEAN, std=STD) -> torch.Tensor:
    return x * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]


@pytest.mark.parametrize("preset", list(VIEW_PRESETS))
@pytest.mark.parametrize("num_views", [None, 4])
def test_presets_shapes_and_normalized_range(preset, num_views):
    views = build_views(preset, image_size=24, mean=MEAN, std=STD, num_views=num_views)
    local = VIEW_PRESETS[preset]["local_crops"]  # multi-crop presets add their local views (10 px at 24 px)
    expected = (num_views or (1 if preset in ("mae", "simmim", "finetune") else 2)) + local
    assert views.num_views == expected
    low = (0 - torch.tensor(MEAN)) / torch.tensor(STD)
    high = (1 - torch.tensor(MEAN)) / torch.tensor(STD)
    torch.manual_seed(0)
    for image in (_random_image(), _random_image((50, 30), seed=1)):
        out = views(image)
        assert isinstance(out, list) and len(out) == expected
        for i, x in enumerate(out):
            side = 24 if i < expected - local else 10
            assert type(x) is torch.Tensor and x.dtype == torch.float32 and x.shape == (3, side, side)
            assert torch.isfinite(x).all()
            assert (x >= low[:, None, None] - 1e-5).all() and (x <= high[:, None, None] + 1e-5).all()


def test_paper_values_in_presets():
    assert VIEW_PRESETS["simclr"]["crop_scale"] == (0.08, 1.0) and VIEW_PRESETS["moco_v2"]["crop_scale"] == (0.2, 1.0)
    assert tuple(VIEW_PRESETS["moco_v3"]["blur_p"]) == (1.0, 0.1)
    assert tuple(VIEW_PRESETS["moco_v3"]["solarize_p"]) == (0.0, 0.2)
    assert VIEW_PRESETS["simmim"]["crop_scale"] == (0.67, 1.0) and VIEW_PRESETS["mae"]["jitter_p"] == 0.0
    # Asymmetric recipe: view 0 always blurred, never solarized; view 1 the other way round.
    params = build_views("moco_v3", image_size=32, mean=MEAN, std=STD).params
    assert (params[0]["blur_p"], params[1]["blur_p"]) == (1.0, 0.1)
    assert (params[0]["solarize_p"], params[1]["solarize_p"]) == (0.0, 0.2)
    # Blur kernel ~10% of the image side, odd, >= 3 (SimCLR: 23 px at 224).
    pipeline = build_views("simclr", image_size=224, mean=MEAN, std=STD).views[0]
    blur = [t for t in pipeline.transforms if "GaussianBlur" in repr(t)]
    assert blur and "kernel_size=(23, 23)" in repr(blur[0])


def test_simclr_preset_follows_the_image_size():
    """google-research/simclr: ImageNet s = 1.0 with blur; CIFAR-10 (32 px) s = 0.5 without blur."""
    imagenet = {"brightness": 0.8, "contrast": 0.8, "saturation": 0.8, "hue": 0.2, "blur_p": 0.5}
    cifar = {"brightness": 0.4, "contrast": 0.4, "saturation": 0.4, "hue": 0.1, "blur_p": 0.0}
    for size, expected in ((224, imagenet), (96, imagenet), (95, cifar), (32, cifar)):
        params = build_views("simclr", image_size=size, mean=MEAN, std=STD).params[0]
        assert {k: params[k] for k in expected} == expected, size
        assert params["jitter_p"] == 0.8 and params["grayscale_p"] == 0.2 and params["crop_scale"] == (0.08, 1.0)
    # either recipe by name at any size; overrides still win
    assert build_views("simclr_imagenet", image_size=32, mean=MEAN, std=STD).params[0]["blur_p"] == 0.5
    assert build_views("simclr_cifar", image_size=224, mean=MEAN, std=STD).params[0]["blur_p"] == 0.0
    assert build_views("simclr", image_size=32, mean=MEAN, std=STD, blur_p=0.5).params[0]["blur_p"] == 0.5


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "LA"])
def test_grayscale_or_other_modes_to_three_channels(mode):
    image = _random_image(mode=mode)
    gray = image.convert("L")
    views = build_views("simclr", image_size=16, mean=(0.5,), std=(0.25,), jitter_p=0.0, grayscale_p=0.0)
    out = views(image)[0]
    assert out.shape == (3, 16, 16)
    if mode in ("L", "LA"):  # grey input: the three channels are copies
        torch.testing.assert_close(out[0], out[1], rtol=0, atol=0)
        torch.testing.assert_close(out[0], out[2], rtol=0, atol=0)
    # Colour jitter (brightness/contrast/saturation/hue) keeps a grey image grey.
    jittered = build_views("simclr", image_size=16, mean=(0.5,), std=(0.25,), jitter_p=1.0)(gray)
    for x in jittered:
        torch.testing.assert_close(x[0], x[1], atol=1e-4, rtol=0)
        torch.testing.assert_close(x[0], x[2], atol=1e-4, rtol=0)


def test_single_channel_models():
    views = build_views("mae", image_size=16, mean=(0.286,), std=(0.353,), in_chans=1)
    assert views(_random_image())[0].shape == (1, 16, 16)
    tensor_rgb = torch.randint(0, 256, (3, 20, 20), dtype=torch.uint8)
    assert views(tensor_rgb)[0].shape == (1, 16, 16)
    # A 1-channel uint8 tensor fed to an RGB pipeline is replicated.
    out = build_views("mae", image_size=16, mean=(0.5,), std=(0.5,))(tensor_rgb[:1])[0]
    assert out.shape == (3, 16, 16) and torch.equal(out[0], out[2])
    with pytest.raises(ValueError, match="in_chans"):
        build_views("mae", image_size=16, mean=MEAN, std=STD, in_chans=1)


def test_seeded_views_repeat():
    views = build_views("moco_v3", image_size=16, mean=MEAN, std=STD)
    image = _random_image()
    torch.manual_seed(5)
    a = views(image)
    torch.manual_seed(5)
    b = views(image)
    torch.manual_seed(6)
    c = views(image)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert not torch.equal(a[0], c[0])
    assert not torch.equal(a[0], a[1])  # the two views of one call differ


def test_full_crop_with_flip_equals_flipped_eval_output():
    image = _random_image((40, 40))
    evaluate = build_eval_transform(image_size=32, mean=MEAN, std=STD)
    views = build_views("simclr", image_size=32, mean=MEAN, std=STD, **{**PLAIN, "flip_p": 1.0})
    for x in views(image):
        torch.testing.assert_close(x, torch.flip(evaluate(image), dims=[-1]))


def _naive_gaussian_blur(x: torch.Tensor, sigma: float, kernel_size: int) -> torch.Tensor:
    """Separable Gaussian with reflect padding, written with explicit loops over taps."""
    half = kernel_size // 2
    weights = [np.exp(-0.5 * (t / sigma) ** 2) for t in range(-half, half + 1)]
    weights = [w / sum(weights) for w in weights]
    padded = torch.nn.functional.pad(x[None], (half, half, half, half), mode="reflect")[0]
    h, w = x.shape[-2:]
    rows = sum(wt * padded[:, :, k : k + w] for k, wt in enumerate(weights))  # along width
    return sum(wt * rows[:, k : k + h, :] for k, wt in enumerate(weights))  # along height


def test_per_view_blur_and_solarize():
    image = _random_image((40, 40))
    evaluate = build_eval_transform(image_size=32, mean=MEAN, std=STD)
    reference = _unnormalize(evaluate(image))  # [0, 1] pixels of the full image
    settings = {**PLAIN, "blur_p": [1.0, 0.0, 1.0], "blur_sigma": (1.0, 1.0), "solarize_p": [0.0, 0.0, 1.0]}
    views = build_views("simclr", image_size=32, mean=MEAN, std=STD, num_views=3, **settings)
    blurred, plain, blurred_solarized = views(image)

    torch.testing.assert_close(plain, evaluate(image))
    expected_blur = _naive_gaussian_blur(reference, sigma=1.0, kernel_size=3)  # 10% of 32 px -> 3
    torch.testing.assert_close(_unnormalize(blurred), expected_blur, atol=1e-5, rtol=0)
    # Solarize (threshold 0.5 on [0, 1] pixels) inverts only the bright pixels.
    expected_solarized = torch.where(expected_blur >= 0.5, 1.0 - expected_blur, expected_blur)
    torch.testing.assert_close(_unnormalize(blurred_solarized), expected_solarized, atol=1e-5, rtol=0)


def test_per_view_range_lists():
    views = build_views("mae", image_size=16, mean=MEAN, std=STD, num_views=2, crop_scale=[(1.0, 1.0), (0.1, 0.2)])
    assert views.params[0]["crop_scale"] == (1.0, 1.0) and views.params[1]["crop_scale"] == (0.1, 0.2)
    shared = build_views("mae", image_size=16, mean=MEAN, std=STD, crop_scale=[0.3, 1.0])  # YAML gives lists
    assert shared.params[0]["crop_scale"] == (0.3, 1.0)


def test_option_errors():
    with pytest.raises(ValueError, match="'blur_p'"):
        build_views("simclr", image_size=16, mean=MEAN, std=STD, blur_prob=0.5)
    with pytest.raises(ValueError, match="'solarize_threshold'"):
        build_views("simclr", image_size=16, mean=MEAN, std=STD, solarise_threshold=0.3)
    with pytest.raises(ValueError, match="3 values but there are 2 views"):
        build_views("simclr", image_size=16, mean=MEAN, std=STD, blur_p=[1.0, 0.5, 0.0])
    with pytest.raises(ValueError, match="probability"):
        build_views("simclr", image_size=16, mean=MEAN, std=STD, flip_p=1.5)
    with pytest.raises(ValueError, match="'moco_v2'"):
        build_views("mocov2", image_size=16, mean=MEAN, std=STD)
    assert set(VIEW_OPTIONS) <= set(VIEW_PRESETS["simclr"])


def test_eval_transform_deterministic_and_center_crop():
    image = _random_image((50, 30))
    evaluate = build_eval_transform(image_size=24, mean=MEAN, std=STD)
    torch.manual_seed(0)
    a = evaluate(image)
    torch.manual_seed(1)
    assert torch.equal(a, evaluate(image)) and a.shape == (3, 24, 24) and a.dtype == torch.float32

    # A red 3 px frame around a blue square: from 64 px up the 8/7 resize + centre crop cuts it off;
    # below 64 px the image is only resized, so the frame survives at the border.
    pixels = np.zeros((70, 70, 3), dtype=np.uint8)
    pixels[..., 0] = 255
    pixels[3:-3, 3:-3] = (0, 0, 255)
    framed = Image.fromarray(pixels)
    big = _unnormalize(build_eval_transform(image_size=64, mean=MEAN, std=STD)(framed))
    small = _unnormalize(build_eval_transform(image_size=32, mean=MEAN, std=STD)(framed))
    assert big.shape == (3, 64, 64) and big[0].max() < 0.05
    assert small[0, 0, :].min() > 0.5 and small[0, 16, 16] < 0.05
    gray = build_eval_transform(image_size=24, mean=(0.5,), std=(0.5,), in_chans=1)(image)
    assert gray.shape == (1, 24, 24)
