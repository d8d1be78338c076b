"""Backbone registry: small-image variants, timm passthrough, rebuild in plain timm, errors."""

import pytest
import timm
import torch
import torch.nn as nn

from selfsup import backbones
from selfsup.backbones import create_backbone, list_backbones, register_backbone


def test_registered_variants_listed():
    assert {"resnet18_small", "resnet50_small", "vit_tiny_patch4", "vit_small_patch4"} <= set(list_backbones())


@pytest.mark.parametrize("in_chans", [1, 3])
def test_resnet18_small_stem_keeps_resolution(in_chans):
    model = create_backbone("resnet18_small", in_chans=in_chans).eval()
    reference = timm.create_model("resnet18", num_classes=0, device="meta")  # stock 7x7 stride-2 stem + max-pool
    assert isinstance(model.conv1, nn.Conv2d)
    assert (model.conv1.kernel_size, model.conv1.stride, model.conv1.padding) == ((3, 3), (1, 1), (1, 1))
    assert model.conv1.weight.shape == (64, in_chans, 3, 3)
    assert isinstance(model.maxpool, nn.Identity)
    # Same key names as timm's resnet18; only conv1's kernel shape differs.
    assert list(model.state_dict()) == list(reference.state_dict())
    x = torch.randn(2, in_chans, 32, 32)
    # Overall stride 8 instead of 32: 32 px -> 4x4 final map (stock resnet18 gives 1x1).
    assert model.forward_features(x).shape == (2, 512, 4, 4)
    assert model(x).shape == (2, model.embed_dim) == (2, 512)
    assert model.patch_size is None
    assert model.backbone_name == "resnet18_small" and model.backbone_kwargs == {"in_chans": in_chans}


def test_resnet50_small_embed_dim():
    # Shapes only, so build on the meta device (no memory, no init cost).
    model = create_backbone("resnet50_small", device="meta").eval()
    assert isinstance(model.maxpool, nn.Identity) and model.conv1.stride == (1, 1)
    assert model.forward_features(torch.empty(1, 3, 32, 32, device="meta")).shape == (1, 2048, 4, 4)
    assert model(torch.empty(1, 3, 32, 32, device="meta")).shape == (1, model.embed_dim) == (1, 2048)


def test_small_resnet_registered_with_timm_builds_same_architecture():
    ours = create_backbone("resnet18_small", in_chans=1)
    assert ours.timm_name == "resnet18_small"
    plain = timm.create_model("resnet18_small", num_classes=0, in_chans=1, device="meta")
    assert {k: v.shape for k, v in plain.state_dict().items()} == {k: v.shape for k, v in ours.state_dict().items()}
    with pytest.raises(ValueError, match="no pretrained weights"):
        timm.create_model("resnet18_small", pretrained=True)


@pytest.mark.parametrize("image_size, grid", [(28, 7), (32, 8)])
def test_vit_patch4_grid(image_size, grid):
    model = create_backbone("vit_tiny_patch4", img_size=image_size).eval()
    assert model.patch_size == 4
    assert model.embed_dim == 192
    assert tuple(model.patch_embed.grid_size) == (grid, grid)
    assert model.pos_embed.shape == (1, 1 + grid * grid, 192)  # class token + one per patch
    assert model(torch.randn(2, 3, image_size, image_size)).shape == (2, 192)


def test_vit_small_patch4_defaults_to_32px():
    model = create_backbone("vit_small_patch4", device="meta")
    assert model.timm_name == "vit_small_patch16_224" and "device" not in model.timm_kwargs
    assert model.timm_kwargs["img_size"] == 32 and model.timm_kwargs["patch_size"] == 4
    assert model.embed_dim == 384 and model.patch_embed.num_patches == 64


@pytest.mark.parametrize(
    "name, kwargs, shape",
    [
        ("resnet18_small", {"in_chans": 1}, (2, 1, 32, 32)),
        ("vit_tiny_patch4", {"img_size": 28, "in_chans": 1, "drop_path_rate": 0.1}, (2, 1, 28, 28)),
        ("test_vit", {"img_size": 32}, (2, 3, 32, 32)),
    ],
)
def test_plain_timm_rebuild_loads_weights_and_matches(name, kwargs, shape):
    """What export relies on: timm.create_model(timm_name, **timm_kwargs) takes the state dict unchanged."""
    torch.manual_seed(0)
    ours = create_backbone(name, **kwargs).eval()
    rebuilt = timm.create_model(ours.timm_name, **ours.timm_kwargs).eval()
    rebuilt.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(*shape)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), ours(x))


@pytest.mark.parametrize("name", ["test_vit", "test_resnet", "mobilenetv3_small_050"])
def test_any_timm_model_embed_dim_matches_forward(name):
    # mobilenetv3 has a conv head after pooling: its pooled size (1024) differs from num_features (288).
    model = create_backbone(name).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 64) if name != "test_vit" else torch.randn(2, 3, 160, 160))
    assert out.shape == (2, model.embed_dim)
    assert model.timm_name == name and model.timm_kwargs == {"num_classes": 0}
    assert (model.patch_size is not None) == name.startswith("test_vit")


def test_unknown_name_suggests_close_matches():
    with pytest.raises(ValueError, match="resnet18_small") as info:
        create_backbone("resnet18_smal")
    assert "any timm model name" in str(info.value)


def test_headless_and_no_downloads():
    with pytest.raises(ValueError, match="num_classes"):
        create_backbone("resnet18_small", num_classes=10)
    with pytest.raises(ValueError, match="pretrained"):
        create_backbone("test_resnet", pretrained=True)


def test_register_custom_backbone(monkeypatch):
    monkeypatch.setattr(backbones, "_REGISTRY", dict(backbones._REGISTRY))

    @register_backbone("tiny_custom")
    def tiny_custom(**kwargs):
        model = timm.create_model("test_resnet", num_classes=0, **kwargs)
        model.timm_name, model.timm_kwargs = "test_resnet", {"num_classes": 0, **kwargs}
        return model

    assert "tiny_custom" in list_backbones()
    model = create_backbone("tiny_custom", in_chans=1)
    assert model.backbone_name == "tiny_custom" and model.conv1[0].in_channels == 1
    with pytest.raises(ValueError, match="already registered"):
        register_backbone("tiny_custom")(tiny_custom)

    @register_backbone("no_timm_source")
    def no_timm_source(**kwargs):
        return timm.create_model("test_resnet", num_classes=0)

    with pytest.raises(ValueError, match="timm_name"):
        create_backbone("no_timm_source")


@pytest.mark.parametrize("name, typo, meant", [
    ("resnet18_small", "stem_widht", "stem_width"),  # a registered variant (SmallStemResNet over timm's ResNet)
    ("vit_tiny_patch4", "patch_sise", "patch_size"),
    ("resnet18", "chanels", "channels"),  # a plain timm name
])
def test_backbone_kwarg_typo_names_the_key_and_the_closest_keyword(name, typo, meant):
    """Before: TypeError "ResNet.__init__() got an unexpected keyword argument 'stem_widht'"."""
    import inspect

    with pytest.raises(ValueError) as info:
        create_backbone(name, **{typo: 8})
    message = str(info.value)
    assert f"backbone.kwargs.{typo}" in message and f"Did you mean backbone.kwargs.{meant}?" in message
    assert "\n" not in message
    # every keyword listed is one the model class really takes
    listed = message.split("Valid: ")[1].rstrip(".").split(", ")
    model_class = type(create_backbone(name))
    taken = {p for klass in model_class.__mro__ if "__init__" in vars(klass)
             for p in inspect.signature(klass.__init__).parameters}
    assert meant in listed and set(listed) <= taken


def test_backbone_kwarg_typo_through_the_cli_is_one_line(tmp_path):
    import subprocess
    import sys

    import yaml

    from tests.conftest import ROOT, tiny_config_dict

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tiny_config_dict(tmp_path)))
    proc = subprocess.run([sys.executable, str(ROOT / "pretrain.py"), "--config", str(path), "backbone.kwargs.stem_widht=8"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr and "backbone.kwargs.stem_width?" in proc.stderr, proc.stderr
