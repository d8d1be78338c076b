"""Config -> objects: the few assembly steps shared by pretrain.py and the tools."""

from __future__ import annotations

import fnmatch
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn
from torch.utils.data import Dataset

from selfsup.backbones import create_backbone
from selfsup.batched_views import BatchedViews, UInt8Images, build_batched_views
from selfsup.config import Config, ConfigError, EvalConfig, from_dict, to_dict
from selfsup.data import DatasetInfo, build_dataset, dataset_info, is_streamed
from selfsup.splits import build_train_test
from selfsup.methods import Method, build_method
from selfsup.sampling import ViewDataset
from selfsup.transforms import build_eval_transform, build_views


def run_dir_for(cfg: Config) -> Path:
    """runs/<run_name or config stem>: the same command always finds the same run (resume=auto)."""
    name = cfg.train.run_name or (Path(cfg.source).stem if cfg.source else f"{cfg.method.name}_{cfg.data.dataset}")
    return Path(cfg.train.output_dir) / name


# What a resumed run (train.resume=auto) may change: how long it trains and how it logs, checkpoints,
# evaluates and uses the machine. Everything else (data, views, backbone, method, optimizer, seed,
# precision, accumulation, clipping) is part of what the checkpoints are a run of. The length keys
# reshape the cosine schedule from the resume point on: that is what "train longer" means here.
RESUMABLE_KEYS = (
    "train.max_steps", "train.epochs",                                     # how long
    "train.log_every_steps", "train.trackers",                             # logging
    "train.checkpoint_every_steps", "train.keep_checkpoints", "train.resume",  # checkpointing
    "train.skip_nonfinite",                                                # resuming past a NaN is its use
    "train.output_dir", "train.run_name",                                  # they found this very directory
    "train.threads", "data.num_workers", "train.compile", "train.channels_last", "data.download",  # machine
    "eval.*",                                                              # the kNN monitor
    "probe.*", "finetune.*",                                               # not read by pretraining
)


def check_same_run(cfg: Config, run_dir: Path) -> None:
    """With train.resume=auto and checkpoints in `run_dir`: refuse, before anything is written, a config that
    differs from the run's own config.yaml in a key outside RESUMABLE_KEYS (the run would mix two set-ups)."""
    from selfsup.checkpoints import list_checkpoints

    saved = run_dir / "config.yaml"
    if cfg.train.resume != "auto" or not saved.is_file() or not list_checkpoints(run_dir / "checkpoints"):
        return
    try:
        old_raw = yaml.safe_load(saved.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{saved} is not readable YAML ({type(e).__name__}); restore it, or set "
                          "train.run_name=<new name> for a new run.") from None
    try:
        old = to_dict(from_dict(old_raw))  # the same normal form as the new config (defaults filled in)
    except ConfigError:
        old = old_raw  # written by another version: compare as written
    changes = [(key, before, after) for key, before, after in config_changes(old, to_dict(cfg))
               if not any(fnmatch.fnmatchcase(key, pattern) for pattern in RESUMABLE_KEYS)]
    changes.sort(key=lambda change: _MISSING in change[1:])  # changed values first, then keys one side lacks
    if changes:
        listed = ", ".join(f"{key} {before!r} -> {after!r}" for key, before, after in changes[:6])
        more = f" and {len(changes) - 6} more" if len(changes) > 6 else ""
        raise ConfigError(
            f"{run_dir} holds a run with other settings ({listed}{more}); nothing was changed. Start a new run "
            f"with train.run_name=<new name>, or delete that directory to redo this one."
        )


_MISSING = "<unset>"


def config_changes(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted key, old value, new value) for every leaf that differs, in key order."""
    out = []
    for key in sorted(set(old) | set(new), key=str):
        a, b = old.get(key, _MISSING), new.get(key, _MISSING)
        name = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out.extend(config_changes(a, b, f"{name}."))
        elif a != b:
            out.append((name, a, b))
    return out


def in_chans(cfg: Config) -> int:
    return int(cfg.backbone.kwargs.get("in_chans", 3))


def build_backbone(cfg: Config) -> nn.Module:
    backbone = create_backbone(cfg.backbone.name, **cfg.backbone.kwargs)
    check_input_size(backbone, cfg.data.image_size, in_chans(cfg))
    return backbone


def check_input_size(backbone: nn.Module, image_size: int, channels: int) -> None:
    """One forward on a blank image before any work, so a size the backbone can't take fails with the fix.

    A token model's patch grid must cover the image exactly: timm's patch embedding (a strided conv)
    would otherwise drop the border that is not a whole patch, without a word."""
    patch = getattr(backbone, "patch_size", None)
    if patch and image_size % patch:
        built = getattr(getattr(backbone, "patch_embed", None), "img_size", None)
        raise ConfigError(
            f"data.image_size={image_size} is not a multiple of the patch size {patch} of backbone "
            f"{getattr(backbone, 'backbone_name', type(backbone).__name__)!r} (built for "
            f"backbone.kwargs.img_size={built[0] if built else '?'}): the patch grid would drop a {image_size % patch} px "
            f"border; use data.image_size (and backbone.kwargs.img_size) {_sizes_near(image_size, patch)}."
        )
    was_training = backbone.training
    backbone.eval()
    try:
        with torch.no_grad():
            out = backbone(torch.zeros(1, channels, image_size, image_size))
    except Exception as e:  # timm raises AssertionError / RuntimeError with internal detail
        expected = getattr(getattr(backbone, "patch_embed", None), "img_size", None)
        fix = (
            f"it was built for {tuple(expected)} px: set backbone.kwargs.img_size={image_size} "
            f"(patch size {getattr(backbone, 'patch_size', '?')} must divide it) or data.image_size={expected[0]}"
            if expected is not None
            else "choose a data.image_size the backbone can reduce (e.g. >= 32 px for stride-32 ResNets; "
            "the *_small variants take 28-64 px)"
        )
        raise ValueError(
            f"Backbone {getattr(backbone, 'backbone_name', type(backbone).__name__)!r} cannot take "
            f"{channels}x{image_size}x{image_size} images (data.image_size={image_size}, in_chans={channels}): {fix}. "
            f"Original error: {e}"
        ) from e
    finally:
        backbone.train(was_training)
    if out.ndim != 2 or out.shape[1] != backbone.embed_dim:
        raise ValueError(
            f"Backbone {backbone.backbone_name!r} returned features of shape {tuple(out.shape)}, expected [N, "
            f"{backbone.embed_dim}]; pass timm kwargs that keep global pooling (do not set global_pool='')."
        )


def _sizes_near(size: int, multiple: int) -> str:
    """The multiples of `multiple` either side of `size`, e.g. '16 or 20'."""
    below = size - size % multiple
    return f"{below} or {below + multiple}" if below > 0 else str(multiple)


def build_pretraining(cfg: Config) -> tuple[Method, Dataset, DatasetInfo]:
    """The method around its backbone, and the training set yielding the method's views
    (or, with data.augment_on=device, uint8 images that `build_batch_transform` turns into views)."""
    method = build_method(cfg.method, build_backbone(cfg))
    info = dataset_info(cfg.data.dataset)
    if _augment_on_device(cfg):
        if type(method).view_transform is not Method.view_transform:
            raise ConfigError(
                f"method {cfg.method.name!r} adds per-sample work to the data pipeline (view_transform), which "
                "data.augment_on=device does not run; set data.augment_on=workers."
            )
        transform = UInt8Images(cfg.data.load_size or cfg.data.image_size, in_chans(cfg))
    else:
        views = build_views(cfg.data.preset or method.views, **_view_kwargs(cfg, info))
        transform = method.view_transform(views)
    if is_streamed(cfg.data.dataset, cfg.data.root):
        return method, build_stream(cfg, transform), info
    base = build_dataset(
        cfg.data.dataset,
        root=cfg.data.root,
        split=cfg.data.split,
        download=cfg.data.download,
        subset=cfg.data.subset,
        seed=cfg.train.seed,
        image_size=cfg.data.image_size,
        num_samples=cfg.data.num_samples,
        num_classes=cfg.data.num_classes,
    )
    return method, ViewDataset(base, transform, seed=cfg.train.seed), info


def build_stream(cfg: Config, transform) -> Dataset:
    """data.dataset=webdataset (the shards under data.root) or hf with a URL data.root (its parquet files): a
    ShardStream of split data.split."""
    from selfsup.shards import read_index
    from selfsup.streaming import ShardStream

    if cfg.data.subset is not None:
        raise ConfigError(f"data.subset is not available for streamed {cfg.data.dataset} data; set data.subset=null "
                          "and write the shards of a smaller folder (tools/make_shards.py)")
    if cfg.data.dataset == "hf":
        from selfsup.hf import ParquetStream

        return ParquetStream(cfg.data.root, cfg.data.split, transform, seed=cfg.train.seed)
    if cfg.data.root is None:
        raise ConfigError("data.dataset=webdataset needs data.root: the directory (or URL) of the shards and _info.json")
    return ShardStream(read_index(cfg.data.root, cfg.data.split), transform, seed=cfg.train.seed)


def build_batch_transform(cfg: Config, method: Method, info: DatasetInfo) -> BatchedViews | None:
    """With data.augment_on=device: the batched views `fit` applies on the training device (compiled
    with train.compile); else None."""
    if not _augment_on_device(cfg):
        return None
    views = build_batched_views(cfg.data.preset or method.views, **_view_kwargs(cfg, info))
    return views.compile() if cfg.train.compile else views


def _augment_on_device(cfg: Config) -> bool:
    if cfg.data.augment_on not in ("workers", "device"):
        raise ConfigError(f"data.augment_on must be 'workers' or 'device', got {cfg.data.augment_on!r}.")
    return cfg.data.augment_on == "device"


def _view_kwargs(cfg: Config, info: DatasetInfo) -> dict:
    kwargs = dict(cfg.data.views)
    if cfg.data.num_views is not None:
        kwargs["num_views"] = cfg.data.num_views
    return dict(image_size=cfg.data.image_size, mean=info.mean, std=info.std, in_chans=in_chans(cfg), **kwargs)


def build_labelled_pair(
    dataset: str,
    *,
    root: str | None,
    image_size: int,
    in_chans: int,
    train_split: str = "train",
    test_split: str = "test",
    max_train: int | None = None,
    max_test: int | None = None,
    download: bool = False,
    seed: int = 0,
    num_samples: int = 512,
    num_classes: int = 10,
    holdout_fraction: float | None = None,
    holdout_seed: int | None = None,
) -> tuple[Dataset, Dataset]:
    """Train/test sets with the deterministic eval transform (the kNN monitor, linear probe on cached
    features); they never share an image (an image_folder without a test split holds part of itself out,
    `eval.holdout_fraction` / `eval.holdout_seed`, their defaults when None)."""
    info = dataset_info(dataset)
    transform = build_eval_transform(image_size=image_size, mean=info.mean, std=info.std, in_chans=in_chans)
    defaults = EvalConfig()
    train, test = build_train_test(
        dataset, root=root, train_split=train_split, test_split=test_split,
        max_train=max_train, max_test=max_test,
        max_train_key="eval.max_train_samples", max_test_key="eval.max_test_samples",
        holdout_fraction=defaults.holdout_fraction if holdout_fraction is None else holdout_fraction,
        holdout_seed=defaults.holdout_seed if holdout_seed is None else holdout_seed,
        download=download, seed=seed, image_size=image_size, num_samples=num_samples, num_classes=num_classes,
    )
    return ViewDataset(train, transform, seed=seed), ViewDataset(test, transform, seed=seed)
