"""Augmentation views per method (papers' recipes) built from torchvision transforms v2.

Written by hand: only the preset table, per-view (asymmetric) overrides and the channel
conversion that lets one pipeline take PIL images of any mode or uint8 tensors.
"""

from __future__ import annotations

import difflib
import numbers
from collections.abc import Callable, Sequence
from types import MappingProxyType
from typing import Any

import torch
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

__all__ = [
    "VIEW_PRESETS", "VIEW_OPTIONS", "MULTI_CROP_OPTIONS", "SIZE_PRESETS", "MultiView", "EvalTransform", "build_views", "build_eval_transform",
    "resolve_preset", "eval_resize_size",
]

# Keys whose value is a (min, max) pair; a per-view list of them is a list of pairs.
_RANGE_KEYS = ("crop_scale", "crop_ratio", "blur_sigma", "local_crop_scale")
# Multi-crop (Caron et al. 2020, SwAV; DINO): besides the num_views global views, `local_crops` small views of
# side `local_crop_size` from crops of `local_crop_scale` of the image. One value each, never per view.
MULTI_CROP_OPTIONS = ("local_crops", "local_crop_size", "local_crop_scale")
VIEW_OPTIONS = (
    "crop_scale", "crop_ratio", "crop_size", "flip_p", "jitter_p", "brightness", "contrast", "saturation", "hue",
    "grayscale_p", "blur_p", "blur_sigma", "solarize_p", "solarize_threshold", *MULTI_CROP_OPTIONS,
)

# Everything off except crop + flip; presets switch on what their paper uses.
_BASE: dict[str, Any] = {
    "num_views": 2,
    "crop_scale": (0.08, 1.0),
    "crop_size": None,  # side of the view in px; None: data.image_size
    "crop_ratio": (3 / 4, 4 / 3),
    "flip_p": 0.5,
    "jitter_p": 0.0,
    "brightness": 0.4,
    "contrast": 0.4,
    "saturation": 0.4,
    "hue": 0.1,
    "grayscale_p": 0.0,
    "blur_p": 0.0,
    "blur_sigma": (0.1, 2.0),
    "solarize_p": 0.0,
    "solarize_threshold": 0.5,  # on images scaled to [0, 1]
    "local_crops": 0,  # multi-crop off
    "local_crop_size": None,  # None: 96/224 of data.image_size (DINO's 96 px beside 224 px)
    "local_crop_scale": (0.05, 0.4),
}

_SIMCLR_IMAGENET = {
    "jitter_p": 0.8, "brightness": 0.8, "contrast": 0.8, "saturation": 0.8, "hue": 0.2, "grayscale_p": 0.2, "blur_p": 0.5,
}

# BYOL's asymmetric views: view 1 always blurred, view 2 rarely blurred and sometimes solarised.
_BYOL = {
    "jitter_p": 0.8, "saturation": 0.2, "grayscale_p": 0.2, "blur_p": (1.0, 0.1), "solarize_p": (0.0, 0.2),
}

# A tuple of scalars (or of pairs, for range keys) gives one entry per view (asymmetric recipes);
# presets cycle it when num_views differs.
VIEW_PRESETS: MappingProxyType[str, MappingProxyType[str, Any]] = MappingProxyType({
    name: MappingProxyType({**_BASE, **values})
    for name, values in {
        # SimCLR (Chen et al. 2020, App. A; google-research/simclr tf2/data_util.py color_jitter: 0.8 s for
        # brightness, contrast, saturation, 0.2 s for hue). "simclr" picks by image size (SIZE_PRESETS):
        # the ImageNet recipe, s = 1.0 with blur half the time (run.py color_jitter_strength 1.0, use_blur), or
        # the CIFAR-10 recipe of the README and App. B.9, s = 0.5 without blur (--color_jitter_strength=0.5
        # --use_blur=False at 32 px). Both are nameable: simclr_imagenet, simclr_cifar.
        "simclr": _SIMCLR_IMAGENET,
        "simclr_imagenet": _SIMCLR_IMAGENET,
        "simclr_cifar": {"jitter_p": 0.8, "grayscale_p": 0.2, "blur_p": 0.0},  # _BASE's jitter is s = 0.5
        # MoCo v2 (Chen et al. 2020, "Improved baselines"; facebookresearch/moco main_moco.py --aug-plus): SimCLR's
        # ImageNet ops with the jitter not strengthened (0.4, 0.4, 0.4, 0.1) and crops from 20%, at any size.
        "moco_v2": {"crop_scale": (0.2, 1.0), "jitter_p": 0.8, "grayscale_p": 0.2, "blur_p": 0.5},
        # MoCo v3 (Chen et al. 2021) = BYOL's asymmetric views (Grill et al. 2020, Table 6).
        "moco_v3": _BYOL,
        # BYOL (Table 6), also Barlow Twins' and VICReg's (barlowtwins main.py Transform, vicreg augmentations.py).
        "byol": _BYOL,
        # MAE (He et al. 2022): random resized crop + flip only.
        "mae": {"num_views": 1, "crop_scale": (0.2, 1.0)},
        # SimMIM (Xie et al. 2022): mild crops + flip.
        "simmim": {"num_views": 1, "crop_scale": (0.67, 1.0)},
        # Linear probe with augmentation and fine-tuning (MoCo / MAE): crop + flip only, crops from
        # 20% as MAE pretrains (the 8% of ImageNet recipes leaves too little of a 28-32 px image).
        "finetune": {"num_views": 1, "crop_scale": (0.2, 1.0)},
        # DINO (Caron et al. 2021; facebookresearch/dino main_dino.py DataAugmentationDINO): BYOL's asymmetric
        # pair as the 2 global views (jitter 0.4, 0.4, 0.2, 0.1; blur 1.0 / 0.1, solarize 0 / 0.2) from 40-100% crops,
        # and 8 local 96 px views from 5-40% crops with blur 0.5. "local": the local views' own values.
        "dino": {
            "crop_scale": (0.4, 1.0), "jitter_p": 0.8, "saturation": 0.2, "grayscale_p": 0.2,
            "blur_p": (1.0, 0.1), "solarize_p": (0.0, 0.2),
            "local_crops": 8, "local": {"blur_p": 0.5, "solarize_p": 0.0},
        },
        # iBOT (Zhou et al. 2022; bytedance/ibot main_ibot.py DataAugmentationiBOT): DINO's ops, with the crops of
        # the README's ViT-S/16 and ViT-B/16 commands: globals from 25%, 10 local crops from 5-25%.
        "ibot": {
            "crop_scale": (0.25, 1.0), "jitter_p": 0.8, "saturation": 0.2, "grayscale_p": 0.2,
            "blur_p": (1.0, 0.1), "solarize_p": (0.0, 0.2),
            "local_crops": 10, "local_crop_scale": (0.05, 0.25), "local": {"blur_p": 0.5, "solarize_p": 0.0},
        },
    }.items()
})


# Presets whose paper has a recipe per image size: below this side (px) the name means the small-image one.
SIZE_PRESETS: MappingProxyType[str, tuple[int, str]] = MappingProxyType({"simclr": (96, "simclr_cifar")})


def resolve_preset(preset: str, image_size: int) -> str:
    """The preset a name means at this image size ("simclr" at 32 px is SimCLR's CIFAR-10 recipe)."""
    if preset in SIZE_PRESETS:
        min_size, small = SIZE_PRESETS[preset]
        return small if image_size < min_size else preset
    return preset


class MultiView:
    """Turns one image into `num_views` independently augmented tensors, the input of joint-embedding methods."""

    def __init__(
        self, views: Sequence[Callable[[torch.Tensor], torch.Tensor]], in_chans: int, params: list[dict]
    ) -> None:
        self.views = list(views)
        self.in_chans = in_chans
        self.params = params  # resolved options of each view, for logging

    @property
    def num_views(self) -> int:
        return len(self.views)

    def __call__(self, image: Image.Image | torch.Tensor) -> list[torch.Tensor]:
        image = _to_channels(image, self.in_chans)  # shared: decode/convert once for all views
        return [_plain(view(image)) for view in self.views]

    def __repr__(self) -> str:
        body = "\n".join(f"  view {i}: {view}" for i, view in enumerate(self.views))
        return f"MultiView(in_chans={self.in_chans},\n{body})"


def build_views(
    preset: str,
    *,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    in_chans: int = 3,
    num_views: int | None = None,
    **overrides: Any,
) -> MultiView:
    """Views for a method's augmentation recipe; `num_views=None` keeps the preset's count (2, or 1 for MAE/SimMIM),
    followed by the preset's `local_crops` multi-crop views (DINO: 8 of 96/224 of the image side).

    A preset with a recipe per image size (SIZE_PRESETS) resolves by `image_size`.

    Each override (see VIEW_OPTIONS) is one value for all views or a list with one value per global view;
    the multi-crop options (MULTI_CROP_OPTIONS) are single values.
    """
    if preset not in VIEW_PRESETS:
        raise ValueError(
            f"unknown view preset {preset!r}{_did_you_mean(preset, VIEW_PRESETS)}; valid: {', '.join(VIEW_PRESETS)}"
        )
    for key in overrides:
        if key not in VIEW_OPTIONS:
            raise ValueError(
                f"unknown view option {key!r}{_did_you_mean(key, VIEW_OPTIONS)}; valid: {', '.join(VIEW_OPTIONS)}"
            )
    settings = dict(VIEW_PRESETS[resolve_preset(preset, image_size)])
    preset_views = settings.pop("num_views")
    num_views = preset_views if num_views is None else num_views
    if num_views < 1:
        raise ValueError(f"num_views must be >= 1, got {num_views}")
    mean, std = _stats(mean, std, in_chans)
    local_settings = dict(settings.pop("local", {}))
    multi_crop = {key: overrides.pop(key, settings.pop(key)) for key in MULTI_CROP_OPTIONS}

    per_view = {key: _per_view(key, value, num_views, cycle=True) for key, value in settings.items()}
    per_view.update({key: _per_view(key, value, num_views, cycle=False) for key, value in overrides.items()})
    params = [{key: values[i] for key, values in per_view.items()} for i in range(num_views)]
    params += _local_params(multi_crop, per_view, local_settings, overrides, image_size)
    for p in params:
        p["crop_size"] = p["crop_size"] or image_size
    views = [_view_pipeline(p, p["crop_size"], mean, std) for p in params]
    return MultiView(views, in_chans, params)


def _local_params(multi_crop: dict[str, Any], per_view: dict[str, list], local_settings: dict[str, Any],
                  overrides: dict[str, Any], image_size: int) -> list[dict[str, Any]]:
    """The options of each local view: the first global view's, then the preset's "local" values, then every
    override given as one value for all views (crop_scale and crop_size are the global views' own)."""
    count, size, scale = (multi_crop[k] for k in MULTI_CROP_OPTIONS)
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ValueError(f"view option local_crops is a number of local views >= 0, got {count!r}")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        raise ValueError(f"view option local_crop_size is a side in px >= 1 (or null), got {size!r}")
    if not count:
        return []
    local = {key: values[0] for key, values in per_view.items()}
    local.update({key: _per_view(key, value, 1, cycle=False)[0] for key, value in local_settings.items()})
    local.update({key: _per_view(key, value, 1, cycle=False)[0] for key, value in overrides.items()
                  if key not in ("crop_scale", "crop_size") and (_is_pair(value) if key in _RANGE_KEYS else not _is_list(value))})
    local["crop_scale"] = _per_view("local_crop_scale", scale, 1, cycle=False)[0]
    local["crop_size"] = size or max(1, round(image_size * 96 / 224))
    return [dict(local) for _ in range(count)]


class EvalTransform:
    """Deterministic image -> normalized tensor; a class (not a lambda) so DataLoader workers can pickle it."""

    def __init__(self, pipeline: v2.Compose, in_chans: int) -> None:
        self.pipeline = pipeline
        self.in_chans = in_chans

    def __call__(self, image: Image.Image | torch.Tensor) -> torch.Tensor:
        return _plain(self.pipeline(_to_channels(image, self.in_chans)))

    def __repr__(self) -> str:
        return f"EvalTransform(in_chans={self.in_chans}, {self.pipeline})"


def build_eval_transform(
    *, image_size: int, mean: Sequence[float], std: Sequence[float], in_chans: int = 3
) -> EvalTransform:
    """Deterministic resize + centre crop for evaluation (ImageNet's 8/7 resize only from 64 px up)."""
    mean, std = _stats(mean, std, in_chans)
    resize = eval_resize_size(image_size)
    pipeline = v2.Compose([
        v2.Resize(resize, antialias=True),  # shorter side
        v2.CenterCrop(image_size),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean, std),
    ])
    return EvalTransform(pipeline, in_chans)


def eval_resize_size(image_size: int) -> int:
    """Shorter side before the centre crop: ImageNet's 8/7 from 64 px up, none below (export writes it as crop_pct)."""
    return round(image_size * 8 / 7) if image_size >= 64 else image_size


# ---------------------------------------------------------------------------------------------


def _did_you_mean(word: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.4)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _stats(mean: Sequence[float], std: Sequence[float], in_chans: int) -> tuple[list[float], list[float]]:
    """Broadcast 1-channel stats to in_chans (grayscale data fed to an RGB encoder)."""
    mean, std = [float(m) for m in mean], [float(s) for s in std]
    for label, stats in (("mean", mean), ("std", std)):
        if len(stats) not in (1, in_chans):
            raise ValueError(f"{label} has {len(stats)} values but in_chans={in_chans}; give 1 or {in_chans} values")
    if any(s <= 0 for s in std):
        raise ValueError(f"std must be positive, got {std}")
    return mean * (in_chans // len(mean)), std * (in_chans // len(std))


def _is_list(value: Any) -> bool:
    """Lists, tuples and config containers such as OmegaConf's ListConfig."""
    return isinstance(value, Sequence) and not isinstance(value, str)


def _is_pair(value: Any) -> bool:
    return _is_list(value) and len(value) == 2 and all(isinstance(v, numbers.Real) for v in value)


def _per_view(key: str, value: Any, num_views: int, *, cycle: bool) -> list[Any]:
    """One value per view: a single value is shared; a list gives each view its own."""
    shared = _is_pair(value) if key in _RANGE_KEYS else not _is_list(value)
    if shared:
        values = [value] * num_views
    else:
        values = list(value)
        if cycle and values:  # a preset's asymmetric pair repeats over extra views
            values = [values[i % len(values)] for i in range(num_views)]
        if len(values) != num_views:
            what = "(min, max) pairs" if key in _RANGE_KEYS else "values"
            raise ValueError(
                f"view option {key}={value!r} lists {len(values)} {what} but there are {num_views} views; "
                f"give one value for all views or exactly {num_views}"
            )
    for v in values:
        if key in _RANGE_KEYS and not (_is_pair(v) and v[0] <= v[1]):
            raise ValueError(f"view option {key} needs (min, max) with min <= max, got {v!r}")
        if key.endswith("_p") and not 0.0 <= v <= 1.0:
            raise ValueError(f"view option {key} is a probability in [0, 1], got {v!r}")
    return [tuple(float(x) for x in v) if key in _RANGE_KEYS else v for v in values]


def _blur_kernel_size(image_size: int) -> int:
    """About 10% of the image side, odd, at least 3 (SimCLR App. A: 23 px at 224)."""
    size = int(0.1 * image_size)
    return max(3, size if size % 2 else size + 1)


def _view_pipeline(p: dict[str, Any], image_size: int, mean: list[float], std: list[float]) -> v2.Compose:
    """One view's chain; ops whose probability is 0 are left out."""
    ops: list[Callable] = [
        v2.RandomResizedCrop(image_size, scale=p["crop_scale"], ratio=p["crop_ratio"], antialias=True),
    ]
    if p["flip_p"] > 0:
        ops.append(v2.RandomHorizontalFlip(p["flip_p"]))
    ops.append(v2.ToDtype(torch.float32, scale=True))  # colour ops below work on [0, 1] floats
    if p["jitter_p"] > 0:
        jitter = v2.ColorJitter(p["brightness"], p["contrast"], p["saturation"], p["hue"])
        ops.append(v2.RandomApply([jitter], p=p["jitter_p"]))
    if p["grayscale_p"] > 0:
        ops.append(v2.RandomGrayscale(p["grayscale_p"]))
    if p["blur_p"] > 0:
        blur = v2.GaussianBlur(_blur_kernel_size(image_size), sigma=p["blur_sigma"])
        ops.append(v2.RandomApply([blur], p=p["blur_p"]))
    if p["solarize_p"] > 0:
        ops.append(v2.RandomSolarize(p["solarize_threshold"], p=p["solarize_p"]))
    ops.append(v2.Normalize(mean, std))
    return v2.Compose(ops)


def _plain(image: torch.Tensor) -> torch.Tensor:
    """Drop the tv_tensors.Image subclass so downstream code sees ordinary tensors."""
    return image.as_subclass(torch.Tensor)


def _to_channels(image: Image.Image | torch.Tensor, in_chans: int) -> torch.Tensor:
    """Image tensor [in_chans, H, W] from a PIL image of any mode or a [C, H, W] tensor."""
    if isinstance(image, Image.Image):
        if in_chans in (1, 3):
            image = image.convert("L" if in_chans == 1 else "RGB")  # L->RGB replicates, RGBA drops alpha
        elif len(image.getbands()) != in_chans:
            raise ValueError(f"cannot turn a {image.mode} image into {in_chans} channels; check model.in_chans")
        return F.to_image(image)
    if not isinstance(image, torch.Tensor) or image.ndim != 3:
        shape = tuple(getattr(image, "shape", ()))
        raise TypeError(f"expected a PIL image or a [C, H, W] tensor, got {type(image).__name__} {shape}")
    channels = image.shape[0]
    if channels == 4 and in_chans != 4:
        image, channels = image[:3], 3  # drop alpha
    if channels == in_chans:
        pass
    elif channels == 1 and in_chans == 3:
        image = image.expand(3, -1, -1)
    elif channels == 3 and in_chans == 1:
        image = F.rgb_to_grayscale(image)
    else:
        raise ValueError(f"cannot turn a {channels}-channel tensor into {in_chans} channels; check model.in_chans")
    return F.to_image(image)
