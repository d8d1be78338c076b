"""Sample statistics of the SimCLR views of this project and of lightly's SimCLRTransform on the same images.

    /work/venv-lightly/bin/python tools/compare/view_stats.py --images 2000 [--ours-crop-scale 0.08 1.0]

Both pipelines are torchvision v2 ops; each op's class is wrapped to record what it drew and did: crop area
fraction, flips, whether colour jitter ran with which brightness / contrast factors and how much it moved
the mean intensity, grayscale. Then the tensors the network sees (normalised views): mean and std. Images: the
first --images of the 20k seed-0 subset of configs/compare/simclr_lightly_protocol.yaml, as RGB.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from lightly.transforms import SimCLRTransform
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from selfsup.config import load_config
from selfsup.data import build_dataset, dataset_info
from selfsup.transforms import build_views

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "compare" / "simclr_lightly_protocol.yaml"
RECORD: dict[str, list[float]] = defaultdict(list)


def _intensity(image) -> float:
    """Mean intensity in [0, 1] of a PIL image or a [C, H, W] tensor (uint8 or float in [0, 1])."""
    if isinstance(image, torch.Tensor):
        return image.float().mean().item() / (255.0 if image.dtype == torch.uint8 else 1.0)
    return float(np.asarray(image, dtype=np.float64).mean() / 255.0)


def _instrument() -> None:
    """Wrap the v2 ops' parameter draws and applications to record them (class-level, for both pipelines)."""
    crop_params = v2.RandomResizedCrop.make_params

    def crop(self, flat_inputs):
        params = crop_params(self, flat_inputs)
        height, width = v2._utils.query_size(flat_inputs)
        RECORD["crop_area"].append(params["height"] * params["width"] / (height * width))
        return params

    flip_transform = v2.RandomHorizontalFlip.transform

    def flip(self, inpt, params):
        RECORD["flip_calls"].append(1.0)
        return flip_transform(self, inpt, params)

    jitter_forward = v2.ColorJitter.forward

    def jitter(self, *inputs):
        before = _intensity(inputs[0])
        out = jitter_forward(self, *inputs)
        RECORD["jitter_calls"].append(1.0)
        RECORD["jitter_intensity_change"].append(_intensity(out) - before)
        RECORD["jitter_abs_intensity_change"].append(abs(_intensity(out) - before))
        return out

    jitter_params = v2.ColorJitter.make_params

    def jitter_draw(self, flat_inputs):
        params = jitter_params(self, flat_inputs)
        RECORD["brightness_factor"].append(float(params["brightness_factor"]))
        RECORD["contrast_factor"].append(float(params["contrast_factor"]))
        return params

    gray_transform = v2.RandomGrayscale.transform

    def gray(self, inpt, params):
        RECORD["gray_calls"].append(1.0)
        return gray_transform(self, inpt, params)

    v2.RandomResizedCrop.make_params = crop
    v2.RandomHorizontalFlip.transform = flip
    v2.ColorJitter.forward = jitter
    v2.ColorJitter.make_params = jitter_draw
    v2.RandomGrayscale.transform = gray


def summarise(views: list[torch.Tensor], n_views: int) -> dict[str, float]:
    x = torch.stack(views)  # [M*2, 3, 32, 32], normalised
    out = {
        "views": n_views,
        "mean_crop_area": float(np.mean(RECORD["crop_area"])),
        "flip_fraction": len(RECORD["flip_calls"]) / n_views,
        "jitter_fraction": len(RECORD["jitter_calls"]) / n_views,
        "mean_brightness_factor": float(np.mean(RECORD["brightness_factor"])),
        "mean_contrast_factor": float(np.mean(RECORD["contrast_factor"])),
        "mean_intensity_change_by_jitter": float(np.mean(RECORD["jitter_intensity_change"])),
        "mean_abs_intensity_change_by_jitter": float(np.mean(RECORD["jitter_abs_intensity_change"])),
        "grayscale_fraction": len(RECORD["gray_calls"]) / n_views,
        "network_input_mean": x.mean().item(),
        "network_input_std": x.std().item(),
        "network_input_channel_means": [round(v, 4) for v in x.mean((0, 2, 3)).tolist()],
    }
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()}


def pixel_compare(images: list, n: int) -> dict[str, float]:
    """The ops both pipelines share, on lightly's input (PIL uint8) and ours (crop on a uint8 tensor, jitter on
    float [0, 1]) with the same parameters: mean absolute difference in 0-255 units."""
    crop = v2.RandomResizedCrop(32, scale=(0.08, 1.0), antialias=True)
    generator = torch.Generator().manual_seed(0)
    crop_diff, jitter_diff = [], []
    for i, image in enumerate(images[:n]):
        torch.manual_seed(i)
        pil = crop(image)  # lightly: PIL in, PIL out
        torch.manual_seed(i)  # the same box
        tensor = crop(F.to_image(image))  # ours: uint8 tensor in, uint8 tensor out
        crop_diff.append(np.abs(np.asarray(pil, dtype=np.float64) - tensor.permute(1, 2, 0).double().numpy()).mean())
        b, c = (0.2 + 1.6 * torch.rand(2, generator=generator)).tolist()  # brightness, contrast factors (s = 1.0)
        pil_jittered = np.asarray(F.adjust_contrast(F.adjust_brightness(pil, b), c), dtype=np.float64)
        float_jittered = F.adjust_contrast(F.adjust_brightness(F.to_dtype(F.to_image(pil), torch.float32, scale=True), b), c)
        jitter_diff.append(np.abs(pil_jittered - 255 * float_jittered.permute(1, 2, 0).double().numpy()).mean())
    return {"crop_resize_mean_abs_diff_255": round(float(np.mean(crop_diff)), 4),
            "brightness_then_contrast_mean_abs_diff_255": round(float(np.mean(jitter_diff)), 4), "images": n}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--ours-crop-scale", type=float, nargs=2, default=None)
    args = parser.parse_args(argv)
    _instrument()
    cfg = load_config(CONFIG)
    info = dataset_info("fashion_mnist")
    images = build_dataset("fashion_mnist", split="train", subset=cfg.data.subset, seed=0)
    images = [images[i][0].convert("RGB") for i in range(args.images)]
    view_options = dict(cfg.data.views)
    if args.ours_crop_scale:
        view_options["crop_scale"] = tuple(args.ours_crop_scale)
    pipelines = {
        "ours": build_views(cfg.data.preset, image_size=cfg.data.image_size, mean=info.mean, std=info.std, in_chans=3,
                            **view_options),
        "lightly": SimCLRTransform(input_size=32, cj_strength=1.0, gaussian_blur=0.0),
    }
    results = {}
    for name, pipeline in pipelines.items():
        torch.manual_seed(0)
        np.random.seed(0)
        RECORD.clear()
        views = [v for image in images for v in pipeline(image)]
        results[name] = summarise(views, len(views))
    results["pixels_pil_vs_tensor"] = pixel_compare(images, min(500, len(images)))
    print(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
