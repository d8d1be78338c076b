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
