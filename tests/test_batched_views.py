"""Batched on-device views: checked per sample against torchvision's functional ops, and in distribution
against the per-image torchvision pipeline of transforms.py (parameters and outputs)."""

import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from selfsup.batched_views import UInt8Images, build_batched_views
from selfsup.builders import build_batch_transform, build_pretraining, run_dir_for
from selfsup.config import ConfigError, from_dict
from selfsup.engine import fit, make_accelerator, make_loader
from selfsup.methods.simclr import SimCLR
from selfsup.transforms import VIEW_PRESETS, build_views
from tests.conftest import read_losses, tiny_config_dict

MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)


def _images(b=8, c=3, h=20, w=24, seed=0):
    return torch.randint(0, 256, (b, c, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _ks(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the empirical CDFs."""
    grid = np.sort(np.concatenate([a, b]))
    cdf_a = np.searchsorted(np.sort(a), grid, side="right") / len(a)
    cdf_b = np.searchsorted(np.sort(b), grid, side="right") / len(b)
    return float(np.abs(cdf_a - cdf_b).max())


def _ks_bound(n: int, m: int) -> float:
    return 1.95 * np.sqrt((n + m) / (n * m))  # rejects equal distributions with probability ~0.001


@pytest.mark.parametrize("preset", list(VIEW_PRESETS))
@pytest.mark.parametrize("in_chans", [3, 1])
def test_shapes_dtypes_and_normalized_range(preset, in_chans):
    mean, std = MEAN[:in_chans], STD[:in_chans]
    views = build_batched_views(preset, image_size=16, mean=mean, std=std, in_chans=in_chans, jitter_p=1.0,
                                grayscale_p=0.5, blur_p=0.5, solarize_p=0.5)
    images, labels = _images(c=in_chans), torch.arange(8)
    out, same_labels = views((images, labels), generator=torch.Generator().manual_seed(0))
    count = (1 if preset in ("mae", "simmim", "finetune") else 2) + VIEW_PRESETS[preset]["local_crops"]
    assert same_labels is labels and len(out) == views.num_views == count
    low = (0 - torch.tensor(mean)) / torch.tensor(std)
    high = (1 - torch.tensor(mean)) / torch.tensor(std)
    for x, p in zip(out, views.params):  # multi-crop: the local views are 96/224 of 16 px = 7 px
        side = 16 if p is views.params[0] or p["crop_size"] == 16 else 7
        assert x.dtype == torch.float32 and x.shape == (8, in_chans, side, side) and x.is_contiguous()
        assert torch.isfinite(x).all()
        assert (x >= low[:, None, None] - 1e-5).all() and (x <= high[:, None, None] + 1e-5).all()
    with pytest.raises(TypeError, match="uint8"):
        views.make_views(images.float())


def _reference_view(image, prm, i, blur_size, threshold, mean, std, size):
    """The per-image chain of transforms.py written with torchvision's functional ops and given parameters."""
    t, l, h, w = (int(getattr(prm, k)[i]) for k in ("top", "left", "height", "width"))
    x = F.resized_crop(image.float() / 255, t, l, h, w, [size, size], antialias=True)
    if prm.flip[i]:
        x = F.horizontal_flip(x)
    if prm.jitter[i]:
        b, c, s, hue = prm.factors[i].tolist()
        ops = [lambda x: F.adjust_brightness(x, b), lambda x: F.adjust_contrast(x, c),
               lambda x: F.adjust_saturation(x, s), lambda x: F.adjust_hue(x, hue)]
        for op in prm.order[i].tolist():
            x = ops[op](x)
    if prm.grayscale[i]:
        x = F.rgb_to_grayscale(x, num_output_channels=x.shape[0])
    if prm.blur[i]:
        x = F.gaussian_blur(x, [blur_size, blur_size], [float(prm.sigma[i])] * 2)
    if prm.solarize[i]:
        x = F.solarize(x, threshold)
    return F.normalize(x, mean, std)


@pytest.mark.parametrize("in_chans", [3, 1])
def test_each_sample_equals_torchvision_functional_ops_with_its_parameters(in_chans):
    mean, std = MEAN[:in_chans], STD[:in_chans]
    # crops both smaller and larger than the output (up- and antialiased down-scaling), every op on,
    # and an asymmetric option: only the second view is ever solarized
    views = build_batched_views("simclr", image_size=24, mean=mean, std=std, in_chans=in_chans, crop_scale=(0.1, 1.0),
                                jitter_p=0.8, grayscale_p=0.3, blur_p=0.5, solarize_p=[0.0, 0.4], solarize_threshold=0.6)
    images = _images(b=48, c=in_chans, h=40, w=36)
    prm = views.sample(48, 40, 36, generator=torch.Generator().manual_seed(1))
    out = views.apply(images, prm)
    assert out.shape == (2, 48, in_chans, 24, 24)
    first, second = prm.view(0, 2), prm.view(1, 2)
    assert not first.solarize.any() and second.solarize.any()
    assert first.flip.any() and first.jitter.any() and first.blur.any() and first.grayscale.any()
    assert (first.height * first.width > 24 * 24).any() and (first.height * first.width < 24 * 24).any()
    for v, p in enumerate((first, second)):
        for i in range(48):
            expected = _reference_view(images[i], p, i, views.blur_size, 0.6, mean, std, 24)
            torch.testing.assert_close(out[v, i], expected, atol=2e-4, rtol=0)


def test_samples_are_independent_and_seeded():
    views = build_batched_views("simclr", image_size=16, mean=MEAN, std=STD)
    images = _images(b=16, h=16, w=16)
    same = images[:1].expand(16, -1, -1, -1).contiguous()

    def run(x, seed):
        return views.make_views(x, torch.Generator().manual_seed(seed))

    out = run(same, 0)[0]  # one image sixteen times: sixteen different views
    assert all(not torch.equal(out[i], out[j]) for i in range(16) for j in range(i))
    # a sample's view depends on its own image and the seed, not on the rest of the batch
    changed = images.clone()
    changed[1:] = 255 - changed[1:]
    for a, b in zip(run(images, 3), run(changed, 3)):
        torch.testing.assert_close(a[0], b[0], rtol=0, atol=0)
    for a, b, c in zip(run(images, 3), run(images, 3), run(images, 4)):
        assert torch.equal(a, b) and not torch.equal(a, c)
    first, second = run(images, 3)
    assert not torch.equal(first, second)  # the two views of one call differ
    # on a CPU the views are made in cache-sized chunks of images: the same as all at once
    many = _images(b=200, h=16, w=16)
    chunked = run(many, 5)
    whole = views.apply(many, views.sample(200, 16, 16, generator=torch.Generator().manual_seed(5)))
    for v in range(2):
        torch.testing.assert_close(chunked[v], whole[v], rtol=0, atol=1e-6)


def _pipeline_ops(preset, size, **overrides):
    pipeline = build_views(preset, image_size=size, mean=MEAN, std=STD, **overrides).views[0].transforms
    crop = next(t for t in pipeline if isinstance(t, v2.RandomResizedCrop))
    jitter = next(t.transforms[0] for t in pipeline if isinstance(t, v2.RandomApply)
                  and isinstance(t.transforms[0], v2.ColorJitter))
    return crop, jitter


@pytest.mark.parametrize("preset,size", [("simclr", (32, 32)), ("moco_v2", (40, 28))])
def test_random_parameters_follow_the_per_image_distributions(preset, size):
    """Crop boxes and jitter factors against torchvision's own make_params on the per-image pipeline's objects."""
    n, (h, w) = 4000, size
    crop, jitter = _pipeline_ops(preset, 24)
    torch.manual_seed(0)
    image = [tv_tensors.Image(torch.zeros(3, h, w, dtype=torch.uint8))]
    boxes = np.array([[p["top"], p["left"], p["height"], p["width"]] for p in (crop.make_params(image) for _ in range(n))])
    factors = [jitter.make_params(image) for _ in range(n)]
    prm = build_batched_views(preset, image_size=24, mean=MEAN, std=STD).sample(
        n, h, w, generator=torch.Generator().manual_seed(0)).view(0, 2)
    ours = torch.stack([prm.top, prm.left, prm.height, prm.width], 1).numpy()

    def features(b):  # area fraction, log aspect, box centre
        return {"scale": b[:, 2] * b[:, 3] / (h * w), "log_ratio": np.log(b[:, 3] / b[:, 2]),
                "cy": (b[:, 0] + b[:, 2] / 2) / h, "cx": (b[:, 1] + b[:, 3] / 2) / w}

    bound = _ks_bound(n, n)
    for key, a in features(boxes).items():
        b = features(ours)[key]
        assert _ks(a, b) < bound, key
        assert abs(np.quantile(a, 0.5) - np.quantile(b, 0.5)) < 0.05 * (np.ptp(a) + 1e-9), key
    for column, key in enumerate(["brightness_factor", "contrast_factor", "saturation_factor", "hue_factor"]):
        assert _ks(np.array([f[key] for f in factors]), prm.factors[:, column].numpy()) < bound, key
    # the op order: a uniform permutation (each op first in a quarter of the samples), as torch.randperm(4)
    first = np.bincount(prm.order[:, 0].numpy(), minlength=4) / n
    first_tv = np.bincount([int(f["fn_idx"][0]) for f in factors], minlength=4) / n
    assert np.abs(first - 0.25).max() < 0.03 and np.abs(first_tv - 0.25).max() < 0.03
    assert sorted(prm.order[0].tolist()) == [0, 1, 2, 3]


def test_event_frequencies_follow_the_view_options():
    n = 20000
    options = dict(flip_p=0.5, jitter_p=0.8, grayscale_p=0.2, blur_p=0.5, solarize_p=0.1)
    views = build_batched_views("simclr", image_size=16, mean=MEAN, std=STD, num_views=1, **options)
    prm = views.sample(n, 16, 16, generator=torch.Generator().manual_seed(0))
    for key, p in options.items():
        rate = getattr(prm, {"flip_p": "flip", "jitter_p": "jitter", "grayscale_p": "grayscale", "blur_p": "blur",
                             "solarize_p": "solarize"}[key]).float().mean().item()
        assert abs(rate - p) < 5 * np.sqrt(p * (1 - p) / n), (key, rate)
    low, high = VIEW_PRESETS["simclr"]["blur_sigma"]
    assert prm.sigma.min() >= low and prm.sigma.max() <= high and abs(prm.sigma.mean() - (low + high) / 2) < 0.02


def test_view_statistics_match_the_per_image_pipeline():
    """Whole SimCLR views of one colourful image: per-view brightness, contrast and colour balance agree."""
    n, size = 1200, 16
    rng = np.random.default_rng(0)
    pixels = np.concatenate([np.linspace(0, 255, 24)[None, :, None].repeat(24, 0),
                             np.linspace(255, 0, 24)[:, None, None].repeat(24, 1),
                             rng.integers(0, 256, (24, 24, 1))], axis=2).astype(np.uint8)
    image = Image.fromarray(pixels)
    per_image = build_views("simclr", image_size=size, mean=MEAN, std=STD)
    torch.manual_seed(0)
    reference = torch.stack([per_image(image)[0] for _ in range(n)])
    batched = build_batched_views("simclr", image_size=size, mean=MEAN, std=STD)
    uint8 = UInt8Images(24)(image)
    ours = batched.make_views(uint8[None].expand(n, -1, -1, -1).contiguous(), torch.Generator().manual_seed(0))[0]

    def stats(x):
        rgb = x * torch.tensor(STD)[:, None, None] + torch.tensor(MEAN)[:, None, None]  # back to [0, 1]
        return {"mean": rgb.mean((1, 2, 3)), "std": rgb.std((1, 2, 3)), "red_minus_green": (rgb[:, 0] - rgb[:, 1]).mean((1, 2)),
                "left_minus_right": (rgb[..., :4].mean((1, 2, 3)) - rgb[..., -4:].mean((1, 2, 3)))}  # flips

    bound = _ks_bound(n, n)
    for key, a in stats(reference).items():
        # rounded: greyscale views sit at 0 up to float noise, whose sign differs between the two paths
        assert _ks(a.numpy().round(4), stats(ours)[key].numpy().round(4)) < bound, key


def test_uint8_images_for_the_loader():
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8))
    x = UInt8Images(16)(rgb)
    assert x.dtype == torch.uint8 and x.shape == (3, 16, 16) and type(x) is torch.Tensor
    same = UInt8Images(30)(rgb.crop((0, 0, 30, 30)))  # already the right size: passed through as stored
    assert torch.equal(same, torch.from_numpy(np.array(rgb.crop((0, 0, 30, 30)))).permute(2, 0, 1))
    gray = UInt8Images(16)(rgb.convert("L"))
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[0], gray[2])
    assert UInt8Images(16, in_chans=1)(rgb).shape == (1, 16, 16)


class MaskingSimCLR(SimCLR):
    """A method with per-sample loader work, which the device path cannot run."""

    def view_transform(self, transform):
        return transform


def test_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="augment_on"):
        build_pretraining(from_dict(tiny_config_dict(tmp_path, data={"augment_on": "gpu"})))
    method = {"name": "tests.test_batched_views:MaskingSimCLR", "proj_hidden_dim": 64, "proj_out_dim": 32}
    with pytest.raises(ConfigError, match="augment_on=workers"):
        build_pretraining(from_dict(tiny_config_dict(tmp_path, method=method, data={"augment_on": "device"})))


def test_fit_with_device_views_trains_and_resumes_with_the_same_views(tmp_path):
    def run(name, resume="never"):
        cfg = from_dict(tiny_config_dict(tmp_path, data={"augment_on": "device", "num_workers": 0},
                                         train={"max_steps": 4, "checkpoint_every_steps": 2, "run_name": name,
                                                "resume": resume}))
        run_dir = run_dir_for(cfg)
        run_dir.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(0)
        method, train_set, info = build_pretraining(cfg)
        image, _ = train_set[(0, 0)]
        assert image.dtype == torch.uint8 and image.shape == (3, 16, 16)  # the loader yields images, not views
        fit(method, make_loader(train_set, cfg.data, seed=0), cfg, make_accelerator(cfg, run_dir), run_dir=run_dir,
            batch_transform=build_batch_transform(cfg, method, info))
        return run_dir

    straight = run("straight")
    losses = read_losses(straight)
    assert sorted(losses) == [1, 2, 3, 4] and all(np.isfinite(v) for v in losses.values())
    # resume from the step-2 checkpoint: steps 3 and 4 see the same views, hence the same losses
    resumed_dir = tmp_path / "runs" / "resumed"
    shutil.copytree(straight / "checkpoints" / "step_00000002", resumed_dir / "ckpt")
    resumed = read_losses(run("resumed", resume=str(resumed_dir / "ckpt")))
    assert sorted(resumed) == [3, 4]
    for step in (3, 4):
        assert resumed[step] == pytest.approx(losses[step], rel=1e-6, abs=1e-6)


@pytest.mark.slow
def test_compiled_views_equal_eager_views():
    """train.compile also compiles the batched views (~20 s of compilation on a CPU core)."""
    views = build_batched_views("simclr", image_size=16, mean=MEAN, std=STD, solarize_p=0.3)
    images = _images(b=200, h=16, w=16)  # several CPU chunks and a smaller last one
    eager = views.make_views(images, torch.Generator().manual_seed(0))
    compiled = views.compile().make_views(images, torch.Generator().manual_seed(0))
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
