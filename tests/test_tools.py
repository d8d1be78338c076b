"""tools/knn.py, tools/linear_probe.py and tools/finetune.py end to end on a tiny image folder, from an
exported encoder and from a backbone name at random init."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from selfsup.backbones import create_backbone
from selfsup.export import save_encoder
from tests.conftest import ROOT, TINY_RESNET

COLOURS = [(230, 40, 40), (40, 40, 230), (40, 200, 40)]


def load_tool(name):
    spec = importlib.util.spec_from_file_location(f"tool_{name}", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """train/ and test/ splits, one sub-folder per class, 16 px PNGs of a noisy class colour."""
    root = tmp_path_factory.mktemp("pets")
    rng = np.random.default_rng(0)
    for split, per_class in (("train", 8), ("test", 4)):
        for label, colour in enumerate(COLOURS):
            directory = root / split / f"class_{label}"
            directory.mkdir(parents=True)
            for i in range(per_class):
                pixels = np.array(colour) * rng.uniform(0.7, 1.0) + rng.normal(0, 15, (16, 16, 3))
                Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(directory / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
    torch.manual_seed(0)
    backbone = create_backbone(TINY_RESNET["name"], **TINY_RESNET["kwargs"])
    directory = tmp_path_factory.mktemp("run") / "encoder"
    save_encoder(backbone, directory, method="simclr", data={"dataset": "image_folder", "image_size": 16, "in_chans": 3})
    return directory


def common(folder, tmp_path):
    return ["--root", str(folder), f"train.output_dir={tmp_path / 'runs'}", "data.num_workers=0"]


def check_result(result, tmp_path, capsys, tool, test_size=12):
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])  # the final JSON line
    saved = json.loads((Path(result["run_dir"]) / "result.json").read_text())
    assert printed == saved == result
    assert result["tool"] == tool and 0 <= result["top1"] <= result["top5"] <= 100
    assert result["test_size"] == test_size and result["num_classes"] == 3
    return result


def test_knn_tool_from_an_exported_encoder(folder, encoder_dir, tmp_path, capsys):
    result = load_tool("knn")(["--encoder", str(encoder_dir), "--k", "3"] + common(folder, tmp_path))
    check_result(result, tmp_path, capsys, "knn")
    assert result["dataset"] == "image_folder"  # taken from the encoder's record
    assert result["top1"] > 80  # colours are trivially separable even for random features
    assert Path(result["run_dir"]).name == "knn_run0_image_folder"


def test_knn_tool_from_a_backbone_name_at_random_init(folder, tmp_path, capsys):
    args = ["--encoder", "resnet18_small", "--dataset", "image_folder", "--image-size", "16", "--k", "3",
            "backbone.kwargs.channels=[8, 8, 8, 8]", "backbone.kwargs.stem_width=8"]
    result = load_tool("knn")(args + common(folder, tmp_path))
    check_result(result, tmp_path, capsys, "knn")
    assert result["random_init"] and result["encoder"] == "resnet18_small"


def test_linear_probe_tool_cached_and_augmented(folder, encoder_dir, tmp_path, capsys):
    probe = load_tool("linear_probe")
    base = ["--encoder", str(encoder_dir), "--epochs", "3", "data.batch_size=8"] + common(folder, tmp_path)
    cached = check_result(probe(base), tmp_path, capsys, "linear_probe")
    assert cached["cache_features"] and (Path(cached["run_dir"]) / "metrics.jsonl").is_file()
    augmented = check_result(probe(base + ["--augment", "--batch-norm"]), tmp_path, capsys, "linear_probe")
    assert not augmented["cache_features"] and augmented["batch_norm"]
    assert augmented["run_dir"] != cached["run_dir"]


@pytest.mark.parametrize("mode, extra", [
    ("frozen", []),
    ("layer_decay", ["--layer-decay", "0.7", "--ema-decay", "0.9", "--mixup", "0.2", "--label-smoothing", "0.1"]),
])
def test_finetune_tool_modes(folder, encoder_dir, tmp_path, capsys, mode, extra):
    args = ["--encoder", str(encoder_dir), "--mode", mode, "--epochs", "2", "data.batch_size=8"] + extra
    result = check_result(load_tool("finetune")(args + common(folder, tmp_path)), tmp_path, capsys, "finetune")
    assert result["mode"] == mode and result["steps"] == 2 * (24 // 8)
    assert ("ema_top1" in result) == ("--ema-decay" in extra)
    assert Path(result["run_dir"]).name == f"finetune_run0_image_folder_{mode}"


def test_tools_refuse_to_resume_a_run_made_with_other_settings(folder, encoder_dir, tmp_path, capsys):
    finetune = load_tool("finetune")
    args = ["--encoder", str(encoder_dir), "--mode", "full", "--max-train", "16", "train.max_steps=1",
            "data.batch_size=8"] + common(folder, tmp_path)
    finetune(args)
    again = finetune(args)  # same inputs: resumes the finished run and only re-evaluates
    assert again["steps"] == 1
    with pytest.raises(SystemExit, match="other settings.*optim.lr"):
        finetune(args + ["--lr", "0.5"])
    with pytest.raises(SystemExit, match="does not exist"):
        finetune(["--encoder", str(tmp_path / "missing" / "encoder")] + common(folder, tmp_path))


def test_settings_layer_recipe_under_file_under_overrides(tmp_path):
    from selfsup.config import load_config

    path = tmp_path / "eval.yaml"
    path.write_text("optim: {lr: 0.5}\nfinetune: {mode: frozen}\n")
    recipe = {"optim": {"name": "adamw", "lr": 1.0}, "train": {"epochs": 7}}
    cfg = load_config(path, ["train.epochs=3"], defaults=recipe)
    assert (cfg.optim.name, cfg.optim.lr, cfg.train.epochs, cfg.finetune.mode) == ("adamw", 0.5, 3, "frozen")
    assert load_config(None, [], defaults=recipe).train.epochs == 7


@pytest.mark.parametrize("name", ["linear_probe_fmnist", "finetune_fmnist"])
def test_shipped_eval_configs_load(name):
    from selfsup.config import load_config

    cfg = load_config(ROOT / "configs" / f"{name}.yaml")
    assert cfg.data.dataset == "fashion_mnist" and cfg.data.image_size == 28


def test_knn_tool_scores_raw_pixels_alone_and_beside_an_encoder(folder, encoder_dir, tmp_path, capsys):
    knn = load_tool("knn")
    pixels = knn(["--encoder", "pixels", "--dataset", "image_folder", "--image-size", "16", "--k", "3"]
                 + common(folder, tmp_path))
    check_result(pixels, tmp_path, capsys, "knn")
    assert pixels["pixels"] and not pixels["random_init"] and pixels["top1"] > 80  # colours separate in pixel space
    both = knn(["--encoder", str(encoder_dir), "--k", "3", "eval.pixel_baseline=true", "--output-dir",
                str(tmp_path / "both")] + common(folder, tmp_path))
    check_result(both, tmp_path, capsys, "knn")
    assert both["pixels_top1"] == pytest.approx(pixels["top1"])  # the same protocol, the same figure


@pytest.fixture(scope="module")
def vit_encoder_dir(tmp_path_factory):
    """A 4 px-patch ViT exported at 16 px (a 4x4 grid of position embeddings)."""
    torch.manual_seed(0)
    backbone = create_backbone("vit_tiny_patch4", depth=1, embed_dim=48, num_heads=2, img_size=16)
    directory = tmp_path_factory.mktemp("vit") / "encoder"
    save_encoder(backbone, directory, method="mae", data={"dataset": "image_folder", "image_size": 16, "in_chans": 3})
    return directory


def test_finetune_a_vit_at_another_size_resamples_its_position_embedding(folder, vit_encoder_dir, tmp_path, capsys):
    import torch.nn.functional as F

    from selfsup.export import load_encoder
    from selfsup.transfer import fit_input_size

    encoder, _ = load_encoder(vit_encoder_dir)
    trained = encoder.pos_embed.detach().clone()
    fit_input_size(encoder, 24, 16)
    # by hand: the class token kept, the 4x4 grid [1, 16, D] -> [1, D, 4, 4] resized to 6x6 (bicubic, antialiased as timm does)
    grid = trained[:, 1:].reshape(1, 4, 4, 48).permute(0, 3, 1, 2)
    resized = F.interpolate(grid, size=(6, 6), mode="bicubic", antialias=True).permute(0, 2, 3, 1).reshape(1, 36, 48)
    assert encoder.pos_embed.shape == (1, 1 + 36, 48)
    assert torch.equal(encoder.pos_embed[:, :1], trained[:, :1]) and torch.allclose(encoder.pos_embed[:, 1:], resized, atol=1e-6)
    args = ["--encoder", str(vit_encoder_dir), "--image-size", "24", "--drop-path", "0.1", "train.max_steps=1",
            "data.batch_size=8"] + common(folder, tmp_path)
    result = check_result(load_tool("finetune")(args), tmp_path, capsys, "finetune")
    assert result["steps"] == 1


def test_tools_refuse_an_image_size_the_encoders_patch_grid_cannot_cover(folder, vit_encoder_dir, tmp_path):
    args = ["--encoder", str(vit_encoder_dir), "--image-size", "18"] + common(folder, tmp_path)
    for tool in ("finetune", "knn"):
        with pytest.raises(SystemExit, match=r"--image-size 18 .*patch size 4 \(trained at 16 px\).*--image-size 16 or 20"):
            load_tool(tool)(args)
    assert not (tmp_path / "runs").exists()


def test_tools_refuse_backbone_settings_the_encoder_contradicts(folder, encoder_dir, tmp_path, capsys):
    finetune = load_tool("finetune")
    vit_settings = tmp_path / "vit.yaml"
    vit_settings.write_text("backbone:\n  kwargs: {img_size: 32, stem_width: 16}\n")
    args = ["--encoder", str(encoder_dir), "--print-config"] + common(folder, tmp_path)
    with pytest.raises(SystemExit) as caught:
        finetune(args + ["--config", str(vit_settings)])
    message = str(caught.value)
    assert "\n" not in message and str(encoder_dir) in message and "'resnet18_small'" in message
    assert "backbone.kwargs.img_size=32 (encoder: not set)" in message and "stem_width" not in message  # 16 is its own
    with pytest.raises(SystemExit, match=r"backbone.name='vit_tiny_patch4'"):
        finetune(args + ["backbone.name=vit_tiny_patch4"])
    # restating the encoder's own architecture is fine, and the resolved config shows it
    printed = finetune(args + [f"backbone.kwargs.stem_width={TINY_RESNET['kwargs']['stem_width']}"])
    assert printed["backbone"] == {"name": TINY_RESNET["name"], "kwargs": TINY_RESNET["kwargs"]}
    assert not (tmp_path / "runs").exists()
