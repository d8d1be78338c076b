"""What the evaluation tools (knn, linear_probe, finetune) share: their inputs, the encoder, the labelled
sets, the run directory and the JSON result.

`--encoder` is a path (an exported encoder directory, a pretraining run directory or a checkpoint
directory; see export.load_encoder) or, for random-init baselines, a backbone name: a registered
variant or any timm model (`resnet18_small`, `timm:resnet18`; the `timm:` prefix forces a name when a
folder of that name exists), built with `backbone.kwargs` and seeded by `train.seed`.
`--image-size` other than the encoder's: a ViT's position embedding is resampled to the new grid (timm's
`set_input_size`, as DeiT / MAE fine-tune at a higher resolution); a size its patches cannot tile is an error.
Settings layer up as: the tool's recipe < what the encoder records (its dataset and image size) <
the `--config` file < the tool's flags < dotted overrides (`optim.lr=0.1`).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml
from accelerate.utils import set_seed
from torch import nn
from torch.utils.data import Dataset

from selfsup.backbones import create_backbone
from selfsup.cli.common import COMMON_FLAGS, build_parser, dest, exit_on_user_error  # noqa: F401 (re-exported)
from selfsup.checkpoints import list_checkpoints
from selfsup.config import Config, ConfigError, load_config, save_config, to_dict
from selfsup.data import dataset_info
from selfsup.splits import build_train_test
from selfsup.evaluation import PixelEncoder
from selfsup.export import load_encoder
from selfsup.sampling import ViewDataset
from selfsup.transforms import build_eval_transform, build_views

NAME_PREFIX = "timm:"
PIXELS = "pixels"  # --encoder pixels: raw pixels as features, the baseline of every protocol

@dataclass
class ToolRun:
    cfg: Config
    encoder: nn.Module
    meta: dict[str, Any]
    in_chans: int
    run_dir: Path
    encoder_spec: str


def setup(
    args: argparse.Namespace, tool: str, defaults: dict[str, Any] | Callable[..., dict[str, Any]],
    flags: list, name_suffix: Callable[[Config], str] = lambda cfg: "",
) -> ToolRun:
    """Config (recipe < encoder's record < file < flags < overrides), encoder and run directory of one tool run.

    `defaults` may be a function (encoder's record, a first reading of the config without a recipe, encoder or
    None) -> recipe: the linear probe's protocol follows the encoder's method.
    """
    path = _encoder_path(args.encoder)
    encoder, meta = load_encoder(path) if path is not None else (None, {})
    overrides = [f"{key}={json.dumps(value)}" for flag, key, _ in COMMON_FLAGS + flags
                 if (value := getattr(args, dest(flag))) is not None]
    if callable(defaults):
        record = meta if path is not None else {"pixels": True} if args.encoder == PIXELS else {"random_init": True}
        first = load_config(args.config, overrides + list(args.overrides), defaults=_layer({}, meta, encoder))
        defaults = defaults(record, first, encoder)
    layered = _layer(defaults, meta, encoder)
    cfg = load_config(args.config, overrides + list(args.overrides), defaults=layered)
    if encoder is not None and (conflicts := _backbone_conflicts(layered["backbone"], cfg.backbone)):
        raise ConfigError(
            f"the encoder in {path} is a {layered['backbone']['name']!r}, but the config sets {'; '.join(conflicts)}; "
            "a loaded encoder keeps its architecture: drop these backbone keys from --config / the overrides "
            "(--image-size resizes a ViT, --drop-path adds stochastic depth)."
        )
    if encoder is None and args.encoder == PIXELS:
        channels = int(cfg.backbone.kwargs.get("in_chans", 3))
        encoder = PixelEncoder(channels, cfg.data.image_size)
        meta = {"backbone": {"name": PIXELS, "kwargs": {"in_chans": channels}}, "pixels": True}
    if encoder is None:
        name = args.encoder[len(NAME_PREFIX):] if args.encoder.startswith(NAME_PREFIX) else args.encoder
        set_seed(cfg.train.seed)
        try:
            encoder = create_backbone(name, **cfg.backbone.kwargs)
        except ValueError as e:
            raise ConfigError(f"--encoder {args.encoder!r} is not an existing path, so it names a backbone at random init: {e}") from e
        meta = {"backbone": {"name": name, "kwargs": dict(cfg.backbone.kwargs)}, "random_init": True}
    in_chans = int(meta.get("data", {}).get("in_chans") or encoder.backbone_kwargs.get("in_chans", 3))
    if not meta.get("pixels"):
        fit_input_size(encoder, cfg.data.image_size, meta.get("data", {}).get("image_size"))
    if args.output_dir:
        run_dir = Path(args.output_dir)
    else:
        run_name = cfg.train.run_name or f"{tool}_{_encoder_tag(args.encoder, path)}_{cfg.data.dataset}{name_suffix(cfg)}"
        run_dir = Path(cfg.train.output_dir) / run_name
    return ToolRun(cfg, encoder, meta, in_chans, run_dir, str(path.resolve()) if path is not None else args.encoder)


def _layer(defaults: dict[str, Any], meta: dict[str, Any], encoder: nn.Module | None) -> dict[str, Any]:
    """The recipe with the encoder's record over it: its dataset, image size and architecture."""
    recorded = {k: v for k, v in meta.get("data", {}).items() if k in ("dataset", "image_size") and v is not None}
    layered = {**defaults, "data": {**defaults.get("data", {}), **recorded}}
    if encoder is not None:  # its architecture is what it is: recorded under the file, so a different one shows
        layered["backbone"] = {"name": meta["backbone"]["name"], "kwargs": dict(meta["backbone"].get("kwargs", {}))}
    return layered


def _backbone_conflicts(recorded: dict[str, Any], configured) -> list[str]:
    """`backbone.*` settings of the config that the encoder's own record contradicts."""
    same = lambda a, b: json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)  # noqa: E731
    out = [] if configured.name == recorded["name"] else [f"backbone.name={configured.name!r}"]
    kwargs = recorded.get("kwargs", {})
    for key, value in configured.kwargs.items():
        if key not in kwargs or not same(value, kwargs[key]):
            was = f"{kwargs[key]!r}" if key in kwargs else "not set"
            out.append(f"backbone.kwargs.{key}={value!r} (encoder: {was})")
    return out


def fit_input_size(encoder: nn.Module, size: int, trained: int | None) -> None:
    """Let a token encoder take `size` px images (--image-size): its patch grid must cover them exactly, and a
    position embedding learnt at another size is resampled (timm's `set_input_size`, bicubic, as in DeiT / MAE
    fine-tuning at a higher resolution). CNNs take any size their strides can reduce; nothing to do."""
    patch = getattr(encoder, "patch_size", None)
    embed = getattr(encoder, "patch_embed", None)
    if not patch or embed is None:
        return
    built = tuple(embed.img_size) if getattr(embed, "img_size", None) is not None else None
    trained_text = f"trained at {trained or built[0]} px" if (trained or built) else "of unknown training size"
    if size % patch:
        below = size - size % patch
        near = f"{below} or {below + patch}" if below else str(patch)
        raise ConfigError(f"--image-size {size} (data.image_size) is not a multiple of the encoder's patch size {patch} "
                          f"({trained_text}): the patch grid would drop a border; use --image-size {near}.")
    if built is None or built == (size, size) or not getattr(embed, "strict_img_size", True):
        return
    set_input_size = getattr(encoder, "set_input_size", None)
    if set_input_size is None:
        raise ConfigError(f"--image-size {size}: the encoder is {trained_text} and {encoder.backbone_name!r} cannot "
                          f"resample its position embedding; use --image-size {built[0]}.")
    set_input_size(img_size=(size, size))
    # a rebuild (with_drop_path) must make the same grid to take these weights
    encoder.backbone_kwargs = {**encoder.backbone_kwargs, "img_size": size}
    encoder.timm_kwargs = {**encoder.timm_kwargs, "img_size": size}
    print(f"[selfsup] encoder {trained_text}, patch {patch}: position embedding resampled to {size} px "
          f"({size // patch}x{size // patch} patches)", file=sys.stderr, flush=True)


def labelled_sets(run: ToolRun, *, augment: bool) -> tuple[Dataset, Dataset, int]:
    """(train, test, classes): train split = data.split / data.subset, test = eval.test_split / eval.max_test_samples.

    The train set yields the `finetune` view preset (data.preset / data.views override it) when
    `augment`, else the deterministic eval transform the test set always uses.
    """
    cfg = run.cfg
    info = dataset_info(cfg.data.dataset)
    size = cfg.data.image_size
    eval_transform = build_eval_transform(image_size=size, mean=info.mean, std=info.std, in_chans=run.in_chans)
    train_transform = eval_transform
    if augment:
        view_kwargs = dict(cfg.data.views)
        train_transform = build_views(cfg.data.preset or "finetune", image_size=size, mean=info.mean, std=info.std,
                                      in_chans=run.in_chans, num_views=1, **view_kwargs)
    common = dict(root=cfg.data.root, download=cfg.data.download, seed=cfg.train.seed, image_size=size,
                  num_samples=cfg.data.num_samples, num_classes=cfg.data.num_classes)
    # never the same images: an image_folder without a test split holds out eval.holdout_fraction of itself
    train, test = build_train_test(cfg.data.dataset, train_split=cfg.data.split, test_split=cfg.eval.test_split,
                                   max_train=cfg.data.subset, max_test=cfg.eval.max_test_samples,
                                   holdout_fraction=cfg.eval.holdout_fraction, holdout_seed=cfg.eval.holdout_seed,
                                   **common)
    num_classes = getattr(train, "num_classes", None)
    if not num_classes:
        raise ConfigError(
            f"{cfg.data.dataset} split {cfg.data.split!r} has no labels here; evaluation needs a labelled set "
            "(image_folder: one sub-folder per class under --root)."
        )
    if getattr(train, "classes", None) is not None and getattr(test, "classes", None) not in (None, train.classes):
        raise ConfigError(f"train classes {train.classes} and test classes {test.classes} differ; give both splits the same class folders.")
    return ViewDataset(train, train_transform, seed=cfg.train.seed), ViewDataset(test, eval_transform, seed=cfg.train.seed), num_classes


def prepare_run_dir(run: ToolRun, tool: str, is_main: bool) -> None:
    """Record the run's inputs; refuse to resume (train.resume=auto) a run made with other inputs."""
    identity = {"tool": tool, "encoder": run.encoder_spec, "config": yaml.safe_load(yaml.safe_dump(to_dict(run.cfg)))}
    record = run.run_dir / "run.json"
    if run.cfg.train.resume == "auto" and list_checkpoints(run.run_dir / "checkpoints") and record.is_file():
        previous = json.loads(record.read_text())
        changed = sorted(_flatten(previous).items() ^ _flatten(identity).items())
        if changed:
            keys = sorted({k for k, _ in changed})
            raise ConfigError(
                f"{run.run_dir} holds a run made with other settings ({', '.join(keys[:6])}); resuming it would "
                "report that run. Pass --output-dir (or train.run_name) for a new run, or train.resume=never to redo it."
            )
    if is_main:
        run.run_dir.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps(identity, indent=2))
        save_config(run.cfg, run.run_dir / "config.yaml")


def finish(run: ToolRun, tool: str, metrics: dict[str, Any], extra: dict[str, Any], output: str | None) -> dict[str, Any]:
    """Write result.json in the run directory (and `output`), print it as the final JSON line."""
    result = {
        "tool": tool,
        "top1": metrics.get("top1"),
        "top5": metrics.get("top5"),
        **{k: v for k, v in metrics.items() if k not in ("top1", "top5", "step", "epoch")},
        **extra,
        "encoder": run.encoder_spec,
        "random_init": bool(run.meta.get("random_init", False)),
        "pixels": bool(run.meta.get("pixels", False)),
        "dataset": run.cfg.data.dataset,
        "run_dir": str(run.run_dir),
    }
    run.run_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(result, indent=2)
    (run.run_dir / "result.json").write_text(text)
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(text)
    print(json.dumps(result), flush=True)
    return result


# --------------------------------------------------------------------------------------------


def _encoder_path(spec: str) -> Path | None:
    """The path `spec` names, or None when it is a backbone name."""
    if spec.startswith(NAME_PREFIX):
        return None
    path = Path(spec).expanduser()
    if path.exists():
        return path
    if "/" in spec or spec.startswith("."):
        raise FileNotFoundError(f"--encoder {spec!r} does not exist; pass RUN/encoder, a run or checkpoint directory, or a backbone name.")
    return None


def _encoder_tag(spec: str, path: Path | None) -> str:
    """A short name for run directories: the run's name for RUN/encoder, `<name>_random` for a backbone name."""
    if spec == PIXELS:
        return PIXELS
    if path is None:
        return spec.removeprefix(NAME_PREFIX).replace("/", "_") + "_random"
    path = path.resolve()
    if path.name == "encoder" or path.parent.name == "checkpoints":
        return path.parent.name if path.name == "encoder" else f"{path.parent.parent.name}_{path.name}"
    return path.name


def _flatten(node: Any, prefix: str = "") -> dict[str, str]:
    if isinstance(node, dict):
        out: dict[str, str] = {}
        for key, value in node.items():
            out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: json.dumps(node)}
