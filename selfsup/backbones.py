"""Backbone registry: any timm model by name, plus variants for 28-64 px images.

Every backbone is the timm model itself (headless, ``num_classes=0``), so its state dict keeps
timm's key names and an exported encoder loads into ``timm.create_model(m.timm_name, **m.timm_kwargs)``.
Written by hand: only the small-stem ResNet (timm has no 3x3 stride-1 stem option) and the registry.
"""

from __future__ import annotations

import difflib
import inspect
import re
from collections.abc import Callable
from typing import Any

import timm
import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.resnet import BasicBlock, Bottleneck, ResNet

__all__ = [
    "register_backbone",
    "create_backbone",
    "list_backbones",
    "is_patch_model",
    "SmallStemResNet",
    "resnet10_small",
    "resnet18_small",
    "resnet50_small",
]

BackboneFactory = Callable[..., nn.Module]
_REGISTRY: dict[str, BackboneFactory] = {}
_PLACEMENT_KWARGS = ("device", "dtype")


def register_backbone(name: str) -> Callable[[BackboneFactory], BackboneFactory]:
    """Decorator adding `fn(**kwargs) -> nn.Module` under `name`, so configs can refer to it by name.

    The factory must return a timm model and set `timm_name` / `timm_kwargs` on it (what plain
    `timm.create_model` needs to rebuild it), which export writes next to the weights.
    """

    def decorator(fn: BackboneFactory) -> BackboneFactory:
        if name in _REGISTRY:
            raise ValueError(f"backbone {name!r} is already registered; pick another name")
        _REGISTRY[name] = fn
        return fn

    return decorator


def list_backbones() -> list[str]:
    """Names registered here (any `timm.list_models()` name works too)."""
    return sorted(_REGISTRY)


def create_backbone(name: str, **kwargs: Any) -> nn.Module:
    """Build a headless backbone whose forward(x: [B, C, H, W]) returns pooled features [B, embed_dim].

    Registered variants win; otherwise `name` is any timm model name (never pretrained: weights
    come from our own checkpoints, so nothing is downloaded here).
    """
    if "num_classes" in kwargs:
        raise ValueError("backbones are headless (num_classes=0); drop the num_classes argument")
    if kwargs.get("pretrained"):
        raise ValueError(
            "create_backbone never downloads weights; drop pretrained=True and load a checkpoint "
            "or exported encoder instead"
        )
    kwargs.pop("pretrained", None)
    try:
        model = _build(name, kwargs)
    except TypeError as e:  # timm: "ResNet.__init__() got an unexpected keyword argument 'stem_widht'"
        match = re.search(r"unexpected keyword argument '([^']+)'", str(e))
        if match is None or match.group(1) not in kwargs:
            raise
        raise ValueError(_unknown_kwarg_message(name, match.group(1))) from e

    # Pooled feature size: head_hidden_size differs from num_features for models with a conv
    # head after pooling (e.g. MobileNetV3), and it is what forward() returns when num_classes=0.
    model.embed_dim = int(getattr(model, "head_hidden_size", None) or model.num_features)
    model.patch_size = _patch_size(model)
    # Placement is the engine's business, not part of the architecture (timm drops it too).
    model.timm_kwargs = {k: v for k, v in model.timm_kwargs.items() if k not in _PLACEMENT_KWARGS}
    model.backbone_name = name
    model.backbone_kwargs = {k: v for k, v in kwargs.items() if k not in _PLACEMENT_KWARGS}
    return model


def _build(name: str, kwargs: dict[str, Any]) -> nn.Module:
    """The model `name` with `kwargs`, timm_name / timm_kwargs set; an unknown name raises with suggestions."""
    if name in _REGISTRY:
        model = _REGISTRY[name](**kwargs)
        if not isinstance(getattr(model, "timm_name", None), str) or not isinstance(
            getattr(model, "timm_kwargs", None), dict
        ):
            raise ValueError(
                f"backbone factory {name!r} must set model.timm_name (str) and model.timm_kwargs (dict) "
                "so the exported encoder can be rebuilt with timm.create_model"
            )
    elif timm.is_model(name):
        model = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
        model.timm_name = name
        model.timm_kwargs = {"num_classes": 0, **kwargs}
    else:
        candidates = list(dict.fromkeys(list_backbones() + timm.list_models()))
        close = difflib.get_close_matches(name, candidates, n=5, cutoff=0.6)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise ValueError(
            f"unknown backbone {name!r}.{hint} Registered: {', '.join(list_backbones())}; "
            "any timm model name also works (see timm.list_models())."
        )
    return model


def _unknown_kwarg_message(name: str, key: str) -> str:
    """backbone.kwargs.<key> is not a keyword of the model: name it, the closest valid one, and the valid ones."""
    try:
        with torch.device("meta"):  # no memory, no init cost
            cls = type(_build(name, {}))
    except Exception:  # the message must not fail where the model's defaults do
        return f"backbone.kwargs.{key} is not a keyword argument of backbone {name!r}; remove or rename it."
    valid = sorted({
        param.name
        for klass in cls.__mro__ if "__init__" in vars(klass)
        for param in inspect.signature(klass.__init__).parameters.values()
        if param.name != "self" and param.kind not in (param.VAR_POSITIONAL, param.VAR_KEYWORD)
    } - {"num_classes", *_PLACEMENT_KWARGS})
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    hint = f" Did you mean backbone.kwargs.{close[0]}?" if close else ""
    return (f"backbone.kwargs.{key} is not a keyword argument of backbone {name!r} ({cls.__name__}).{hint} "
            f"Valid: {', '.join(valid)}.")


def is_patch_model(name: str, **kwargs: Any) -> bool:
    """Whether backbone `name` tokenises images with a patch embedding (ViT, DeiT, Swin, ...).

    Built on the meta device: no memory, no init cost, so configs can ask before any model exists.
    """
    with torch.device("meta"):
        model = create_backbone(name, **{k: v for k, v in kwargs.items() if k not in _PLACEMENT_KWARGS})
    return getattr(model, "patch_embed", None) is not None


def _patch_size(model: nn.Module) -> int | None:
    """Square patch size of token models (what MAE/SimMIM masking works in), None for CNNs."""
    patch_embed = getattr(model, "patch_embed", None)
    size = getattr(patch_embed, "patch_size", None)
    if size is None:
        return None
    if isinstance(size, int):
        return size
    size = tuple(size)
    return int(size[0]) if len(set(size)) == 1 else None


# ---------------------------------------------------------------------------------------------
# Small-stem ResNets (CIFAR-style stem, He et al. 2016 Sec. 4.2): also registered with timm so
# that, once `selfsup.backbones` is imported, timm.create_model("resnet18_small") rebuilds them.
# ---------------------------------------------------------------------------------------------


class SmallStemResNet(ResNet):
    """timm ResNet whose stem keeps full resolution (3x3 stride-1 conv, no max-pool) for 28-64 px."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        old = self.conv1
        if not isinstance(old, nn.Conv2d):
            raise ValueError("the small stem replaces a single conv1; drop stem_type/deep-stem arguments")
        if not isinstance(self.maxpool, nn.MaxPool2d):
            raise ValueError("the small stem removes the stem max-pool; drop replace_stem_pool/aa_layer")
        # Same attribute name keeps the state-dict key `conv1.weight`.
        self.conv1 = nn.Conv2d(
            old.in_channels, old.out_channels, kernel_size=3, stride=1, padding=1, bias=False,
            device=old.weight.device, dtype=old.weight.dtype,
        )
        nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")  # as timm's init
        self.maxpool = nn.Identity()
        # The stem no longer downsamples by 4 (stride-2 conv + stride-2 pool).
        for info in self.feature_info:
            info["reduction"] = max(1, info["reduction"] // 4)


def _small_resnet_cfg() -> dict[str, Any]:
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, 32, 32),
        "pool_size": (4, 4),
        "crop_pct": 1.0,
        "interpolation": "bilinear",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "conv1",
        "classifier": "fc",
    }


# Read by timm's @register_model below (it looks up `default_cfgs` in the entrypoint's module).
default_cfgs = generate_default_cfgs(
    {"resnet10_small": _small_resnet_cfg(), "resnet18_small": _small_resnet_cfg(), "resnet50_small": _small_resnet_cfg()}
)


def _create_small_resnet(variant: str, pretrained: bool, **kwargs: Any) -> SmallStemResNet:
    # Weights come only from an exported encoder: timm.create_model("local-dir:DIR" / "hf-hub:ID", pretrained=True)
    # hands its config.json's pretrained_cfg (file / hf_hub_id) to this factory.
    source = kwargs.get("pretrained_cfg")
    source = source if isinstance(source, dict) else getattr(source, "__dict__", {}) if source is not None else {}
    if pretrained and not (source.get("file") or source.get("hf_hub_id")):
        raise ValueError(f"{variant} has no pretrained weights; use pretrained=False, or load an exported encoder "
                         "with timm.create_model('local-dir:RUN/encoder', pretrained=True)")
    return build_model_with_cfg(SmallStemResNet, variant, pretrained=pretrained, **kwargs)


@register_model
def resnet10_small(pretrained: bool = False, **kwargs: Any) -> SmallStemResNet:
    """timm entrypoint: ResNet-10 (one BasicBlock per stage) with the small stem: half ResNet-18's cost,
    the quickstart's backbone at a quarter width (configs/quickstart.yaml says why)."""
    model_args = dict(block=BasicBlock, layers=(1, 1, 1, 1))
    return _create_small_resnet("resnet10_small", pretrained, **dict(model_args, **kwargs))


@register_model
def resnet18_small(pretrained: bool = False, **kwargs: Any) -> SmallStemResNet:
    """timm entrypoint: ResNet-18 with a 3x3 stride-1 stem and no max-pool (CIFAR-style)."""
    model_args = dict(block=BasicBlock, layers=(2, 2, 2, 2))
    return _create_small_resnet("resnet18_small", pretrained, **dict(model_args, **kwargs))


@register_model
def resnet50_small(pretrained: bool = False, **kwargs: Any) -> SmallStemResNet:
    """timm entrypoint: ResNet-50 with a 3x3 stride-1 stem and no max-pool (CIFAR-style)."""
    model_args = dict(block=Bottleneck, layers=(3, 4, 6, 3))
    return _create_small_resnet("resnet50_small", pretrained, **dict(model_args, **kwargs))


def _timm_backbone(timm_name: str, **timm_kwargs: Any) -> nn.Module:
    """Create a headless timm model and record how plain timm rebuilds it."""
    timm_kwargs = {"num_classes": 0, **timm_kwargs}
    model = timm.create_model(timm_name, pretrained=False, **timm_kwargs)
    model.timm_name = timm_name
    model.timm_kwargs = timm_kwargs
    return model


@register_backbone("resnet10_small")
def _resnet10_small(**kwargs: Any) -> nn.Module:
    return _timm_backbone("resnet10_small", **kwargs)


@register_backbone("resnet18_small")
def _resnet18_small(**kwargs: Any) -> nn.Module:
    return _timm_backbone("resnet18_small", **kwargs)


@register_backbone("resnet50_small")
def _resnet50_small(**kwargs: Any) -> nn.Module:
    return _timm_backbone("resnet50_small", **kwargs)


# ViTs with 4 px patches: a 32 px image gives an 8x8 token grid, 28 px a 7x7 one.
@register_backbone("vit_tiny_patch4")
def _vit_tiny_patch4(**kwargs: Any) -> nn.Module:
    return _timm_backbone("vit_tiny_patch16_224", **{"patch_size": 4, "img_size": 32, **kwargs})


@register_backbone("vit_small_patch4")
def _vit_small_patch4(**kwargs: Any) -> nn.Module:
    return _timm_backbone("vit_small_patch16_224", **{"patch_size": 4, "img_size": 32, **kwargs})


# Swin with 2 px patches and 4 x 4 windows (timm's Swin-T otherwise): a 32 px image gives a 16x16 patch grid,
# then 8, 4 and 2 after the three patch merges (stride 16), small enough for CPU runs of SimMIM on Swin.
@register_backbone("swin_tiny_patch2_window4")
def _swin_tiny_patch2_window4(**kwargs: Any) -> nn.Module:
    return _timm_backbone("swin_tiny_patch4_window7_224", **{"patch_size": 2, "window_size": 4, "img_size": 32, **kwargs})
