"""Multi-crop (2 global + N local views of another size): per image (transforms.build_views) and batched on the
device (multicrop.MultiSizeViews) give the configured sizes and counts and the same parameter distributions."""

import numpy as np
import pytest
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from selfsup.batched_views import BatchedViews, build_batched_views
from selfsup.multicrop import MultiSizeViews, size_groups
from selfsup.transforms import build_views
from tests.test_batched_views import _images, _ks, _ks_bound

MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
SETTINGS = {"image_size": 28, "mean": MEAN, "std": STD, "local_crops": 3, "local_crop_size": 12}


def test_both_pipelines_make_the_configured_sizes_counts_and_options():
    per_image = build_views("dino", **SETTINGS)
    batched = build_batched_views("dino", **SETTINGS)
    assert isinstance(batched, MultiSizeViews) and batched.params == per_image.params
    assert [p["crop_size"] for p in per_image.params] == [28, 28, 12, 12, 12]
    assert [p["crop_scale"] for p in per_image.params] == [(0.4, 1.0)] * 2 + [(0.05, 0.4)] * 3  # DINO's scales
    assert [p["blur_p"] for p in per_image.params] == [1.0, 0.1, 0.5, 0.5, 0.5]  # global 1 / global 2 / local
    assert [p["solarize_p"] for p in per_image.params] == [0.0, 0.2, 0.0, 0.0, 0.0]
    out = per_image(torch.randint(0, 256, (3, 40, 36), dtype=torch.uint8))
    assert [tuple(x.shape) for x in out] == [(3, 28, 28)] * 2 + [(3, 12, 12)] * 3
    views, labels = batched((_images(b=6, h=40, w=36), torch.arange(6)), generator=torch.Generator().manual_seed(0))
    assert [tuple(x.shape) for x in views] == [(6, 3, 28, 28)] * 2 + [(6, 3, 12, 12)] * 3
    assert [g.image_size for g in batched.groups] == [28, 12] and [g.num_views for g in batched.groups] == [2, 3]


def test_defaults_overrides_and_errors():
    default = build_views("dino", image_size=224, mean=MEAN, std=STD)
    assert [p["crop_size"] for p in default.params] == [224] * 2 + [96] * 8  # the paper's 2 x 224 + 8 x 96
    one_size = build_batched_views("dino", image_size=28, mean=MEAN, std=STD, local_crops=0)
    assert isinstance(one_size, BatchedViews) and one_size.num_views == 2
    shared = build_views("dino", **SETTINGS, flip_p=0.0, crop_scale=[0.5, 1.0], local_crop_scale=[0.1, 0.3])
    assert [p["flip_p"] for p in shared.params] == [0.0] * 5  # one value: every view, locals too
    assert [p["crop_scale"] for p in shared.params] == [(0.5, 1.0)] * 2 + [(0.1, 0.3)] * 3  # crop_scale: globals
    per_global = build_views("dino", **SETTINGS, blur_p=[0.2, 0.3])
    assert [p["blur_p"] for p in per_global.params] == [0.2, 0.3, 0.5, 0.5, 0.5]  # a list: one per global view
    with pytest.raises(ValueError, match="local_crops is a number of local views >= 0"):
        build_views("dino", image_size=28, mean=MEAN, std=STD, local_crops=-1)
    with pytest.raises(ValueError, match="local_crop_size is a side in px"):
        build_views("dino", image_size=28, mean=MEAN, std=STD, local_crop_size=0.5)
    with pytest.raises(ValueError, match="unknown view option 'local_crop'"):
        build_views("dino", image_size=28, mean=MEAN, std=STD, local_crop=2)
    assert size_groups([{"crop_size": s} for s in (28, 28, 12, 28)]) == [[{"crop_size": 28}] * 2, [{"crop_size": 12}],
                                                                         [{"crop_size": 28}]]


def test_local_crop_parameters_follow_the_per_image_distribution():
    """The local views' crop boxes and events: batched draws against torchvision's make_params of the per-image
    local view (the global views are the existing BatchedViews, tested in test_batched_views.py)."""
    n, h, w = 3000, 40, 36
    local_view = build_views("dino", **SETTINGS).views[2].transforms
    crop = next(t for t in local_view if isinstance(t, v2.RandomResizedCrop))
    assert tuple(crop.size) == (12, 12) and tuple(crop.scale) == (0.05, 0.4)
    torch.manual_seed(0)
    image = [tv_tensors.Image(torch.zeros(3, h, w, dtype=torch.uint8))]
    boxes = np.array([[p["top"], p["left"], p["height"], p["width"]] for p in (crop.make_params(image) for _ in range(n))])
    local_group = build_batched_views("dino", **SETTINGS).groups[1]
    prm = local_group.sample(n, h, w, generator=torch.Generator().manual_seed(0)).view(0, 3)
    ours = torch.stack([prm.top, prm.left, prm.height, prm.width], 1).numpy()

    def features(b):
        return {"scale": b[:, 2] * b[:, 3] / (h * w), "log_ratio": np.log(b[:, 3] / b[:, 2]),
                "cy": (b[:, 0] + b[:, 2] / 2) / h, "cx": (b[:, 1] + b[:, 3] / 2) / w}

    for key, a in features(boxes).items():
        assert _ks(a, features(ours)[key]) < _ks_bound(n, n), key
    assert abs(prm.blur.float().mean().item() - 0.5) < 5 * np.sqrt(0.25 / n) and not prm.solarize.any()
    assert local_group.blur_size == 3  # 10 % of the 12 px view, odd, >= 3: as the per-image local view's blur
    blur = next(t.transforms[0] for t in local_view if isinstance(t, v2.RandomApply) and isinstance(t.transforms[0], v2.GaussianBlur))
    assert list(blur.kernel_size) == [3, 3]
