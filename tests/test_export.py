"""Export in timm's own Hub format: plain timm (without this project) loads it, timm's writer would write the
same config.json, timm's data pipeline sees the training size and statistics, and old exports keep loading."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

from selfsup.backbones import create_backbone
from selfsup.export import (
    EncoderLoadError, load_encoder, save_encoder, timm_data_config, timm_model_config,
)
from selfsup.transforms import eval_resize_size

TINY_VIT = {"img_size": 28, "in_chans": 1, "depth": 2, "embed_dim": 48, "num_heads": 2, "drop_path_rate": 0.1}
TINY_RESNET = {"channels": [8, 16, 32, 64], "stem_width": 8}
FMNIST = {"dataset": "fashion_mnist", "image_size": 28, "mean": [0.286], "std": [0.353], "in_chans": 1}


def _vit():
    torch.manual_seed(0)
    return create_backbone("vit_tiny_patch4", **TINY_VIT).eval()


def _resnet():
    torch.manual_seed(0)
    return create_backbone("resnet18_small", **TINY_RESNET).eval()


def test_layout_timm_config_beside_our_record(tmp_path):
    save_encoder(_vit(), tmp_path / "enc", method="mae", run="runs/mae", data=FMNIST)
    assert sorted(p.name for p in (tmp_path / "enc").iterdir()) == ["config.json", "model.safetensors", "selfsup.json"]
    hub = json.loads((tmp_path / "enc" / "config.json").read_text())
    assert hub["architecture"] == "vit_tiny_patch16_224" and hub["num_classes"] == 0 and hub["num_features"] == 48
    assert {k: hub["model_args"][k] for k in ("patch_size", "img_size", "in_chans", "depth", "embed_dim")} == {
        "patch_size": 4, "img_size": [28, 28], "in_chans": 1, "depth": 2, "embed_dim": 48}
    cfg = hub["pretrained_cfg"]
    assert cfg["input_size"] == [1, 28, 28] and cfg["mean"] == [0.286] and cfg["std"] == [0.353]
    assert cfg["interpolation"] == "bilinear" and cfg["crop_pct"] == 1.0
    assert cfg["tag"] == "selfsup_mae" and cfg["license"] is None  # not the ImageNet weights the default tag names
    ours = json.loads((tmp_path / "enc" / "selfsup.json").read_text())
    assert ours["backbone"] == {"name": "vit_tiny_patch4", "kwargs": TINY_VIT}
    assert (ours["method"], ours["run"], ours["data"]["dataset"]) == ("mae", "runs/mae", "fashion_mnist")


@pytest.mark.parametrize("make, data", [(_vit, FMNIST), (_resnet, {"dataset": "stl10", "image_size": 96})])
def test_config_json_is_what_timm_save_for_hf_writes(tmp_path, make, data):
    """The independent formulation: timm's own save_for_hf on the same model with the same model/data config."""
    from timm.models import save_for_hf

    model = make()
    save_encoder(model, tmp_path / "ours", method="simclr", data=data)
    save_for_hf(model, str(tmp_path / "timm"), safe_serialization=True, model_config=timm_model_config("simclr"),
                data_config=timm_data_config(model, data))
    assert json.loads((tmp_path / "ours" / "config.json").read_text()) == json.loads(
        (tmp_path / "timm" / "config.json").read_text())
    ours, theirs = load_file(str(tmp_path / "ours" / "model.safetensors")), load_file(str(tmp_path / "timm" / "model.safetensors"))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


# Runs with `python -I` (no cwd, no PYTHONPATH on sys.path) and a finder that refuses `selfsup` even where an
# (editable) install would provide it: what a user without this project has.
PLAIN_TIMM = r"""
import importlib.abc, json, sys

class NoSelfsup(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "selfsup" or name.startswith("selfsup."):
            raise ImportError("selfsup is not installed here")

sys.meta_path.insert(0, NoSelfsup())
try:
    import selfsup
    sys.exit("selfsup imported: the test would prove nothing")
except ImportError:
    pass
import timm, torch
from safetensors.torch import load_file

vit_dir, resnet_dir, io_file, out_file = sys.argv[1:5]
model = timm.create_model("local-dir:" + vit_dir, pretrained=True).eval()
with torch.no_grad():
    features = model(load_file(io_file)["x"])
data = timm.data.resolve_data_config({}, model=model)
try:
    timm.create_model("local-dir:" + resnet_dir, pretrained=True)
    resnet_error = None
except RuntimeError as e:
    resnet_error = str(e)
json.dump({"features": features.tolist(), "data": data, "resnet_error": resnet_error,
           "selfsup_loaded": any(m.split(".")[0] == "selfsup" for m in sys.modules)}, open(out_file, "w"))
"""


def test_plain_timm_without_selfsup_loads_the_exported_vit(tmp_path):
    vit = _vit()
    save_encoder(vit, tmp_path / "vit", method="mae", data=FMNIST)
    save_encoder(_resnet(), tmp_path / "resnet", method="simclr", data={"dataset": "synthetic", "image_size": 16})
    x = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = vit(x)
    save_file({"x": x}, str(tmp_path / "io.safetensors"))
    script = tmp_path / "plain_timm.py"
    script.write_text(PLAIN_TIMM)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(tmp_path / "empty")}
    proc = subprocess.run([sys.executable, "-I", str(script), str(tmp_path / "vit"), str(tmp_path / "resnet"),
                           str(tmp_path / "io.safetensors"), str(tmp_path / "out.json")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = json.loads((tmp_path / "out.json").read_text())
    assert not out["selfsup_loaded"]
    torch.testing.assert_close(torch.tensor(out["features"]), expected, rtol=1e-5, atol=1e-5)
    assert out["data"]["input_size"] == [1, 28, 28]  # the training size, not timm's 224
    assert out["data"]["mean"] == [0.286] and out["data"]["std"] == [0.353]  # Fashion-MNIST's, not 0.5
    # The small-stem ResNet needs `import selfsup.backbones` (timm cannot express its stem; see below and README).
    assert "Unknown model (resnet18_small)" in out["resnet_error"]


def test_small_resnet_loads_through_timm_local_dir_once_registered(tmp_path):
    model = _resnet()
    save_encoder(model, tmp_path / "enc", method="simclr", data={"dataset": "cifar10", "image_size": 32})
    plain = timm.create_model(f"local-dir:{tmp_path / 'enc'}", pretrained=True).eval()  # selfsup.backbones imported
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), model(x), rtol=0, atol=0)
    data = timm.data.resolve_data_config({}, model=plain)
    assert data["input_size"] == (3, 32, 32) and data["mean"] == [0.4914, 0.4822, 0.4465]
    with pytest.raises(ValueError, match="no pretrained weights"):  # still nothing to download by name
        timm.create_model("resnet18_small", pretrained=True)


@pytest.mark.parametrize("stem_type", ["", "deep", "deep_tiered"])
@pytest.mark.parametrize("replace_stem_pool", [False, True])
def test_timm_resnet_kwargs_cannot_express_the_small_stem(stem_type, replace_stem_pool):
    """Why resnet18_small stays a registered architecture: every stem timm's ResNet offers downsamples 32 px by 4
    before layer1 (ours keeps 32 x 32). Should timm gain such an option, this fails and the export can use it."""
    ours = create_backbone("resnet18_small", device="meta")
    theirs = timm.create_model("resnet18", num_classes=0, stem_type=stem_type, replace_stem_pool=replace_stem_pool,
                               device="meta")
    x = torch.empty(1, 3, 32, 32, device="meta")

    def stem(m):
        return m.maxpool(m.act1(m.bn1(m.conv1(x)))).shape[-2:]

    assert stem(ours) == (32, 32)
    assert stem(theirs) == (8, 8)


@pytest.mark.parametrize("size", [16, 28, 64, 96, 224])
def test_timm_eval_pipeline_resizes_as_ours(size):
    """crop_pct in config.json makes timm's eval transform resize to our eval transform's size."""
    data = timm_data_config(_resnet(), {"image_size": size, "mean": [0.5], "std": [0.25]})
    transform = timm.data.create_transform(**timm.data.resolve_data_config(data))
    resize = next(t for t in transform.transforms if type(t).__name__ == "Resize")
    assert resize.size == eval_resize_size(size)
    assert data["input_size"] == (3, size, size) and data["mean"] == (0.5, 0.5, 0.5)  # grey stats broadcast


def _save_the_old_way(encoder, directory: Path, **extra):
    """Version 1, as save_encoder wrote it before timm's Hub format: our metadata under the name config.json."""
    directory.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in encoder.state_dict().items()}, str(directory / "model.safetensors"),
              metadata={"format": "pt"})
    meta = {"format": "selfsup-encoder", "version": 1,
            "backbone": {"name": encoder.backbone_name, "kwargs": encoder.backbone_kwargs},
            "timm": {"model_name": encoder.timm_name, "kwargs": encoder.timm_kwargs},
            "embed_dim": encoder.embed_dim, "patch_size": encoder.patch_size, **extra}
    (directory / "config.json").write_text(json.dumps(meta, indent=2))


@pytest.mark.parametrize("make", [_vit, _resnet])
def test_encoders_exported_the_old_way_keep_loading(tmp_path, make):
    model = make()
    _save_the_old_way(model, tmp_path / "run" / "encoder", method="simclr", data={"image_size": 28})
    for path in (tmp_path / "run" / "encoder", tmp_path / "run"):
        loaded, meta = load_encoder(path)
        assert meta["method"] == "simclr" and meta["data"]["image_size"] == 28
        x = torch.randn(2, model.backbone_kwargs.get("in_chans", 3), 28, 28)
        with torch.no_grad():
            assert torch.equal(loaded.eval()(x), model(x))


def test_a_folder_saved_by_timm_loads_as_an_encoder(tmp_path):
    from timm.models import save_for_hf

    model = timm.create_model("test_vit", num_classes=0, img_size=32).eval()
    save_for_hf(model, str(tmp_path / "hub"), safe_serialization=True,
                data_config={"input_size": (3, 32, 32), "mean": (0.1, 0.2, 0.3), "std": (0.5, 0.5, 0.5)})
    loaded, meta = load_encoder(tmp_path / "hub")
    assert meta["backbone"]["name"] == "test_vit" and meta["data"]["image_size"] == 32
    assert meta["data"]["mean"] == [0.1, 0.2, 0.3]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), model(x))
    headed = timm.create_model("test_vit", num_classes=5, img_size=32)
    save_for_hf(headed, str(tmp_path / "headed"), safe_serialization=True)
    with pytest.raises(EncoderLoadError, match="5-class head.*reset_classifier"):
        load_encoder(tmp_path / "headed")
