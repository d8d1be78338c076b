"""Typed run configuration: YAML file + dotted command-line overrides, validated before any work.

Hand-written on dataclasses rather than OmegaConf because the one thing we need beyond a typed
merge is an error that names the closest valid key, and each method declares its own section
(`Method.Config`), which is resolved by the method's name. The generic part (nested dict -> typed
dataclass, dotted overrides) is selfsup/typed.py.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from selfsup.typed import ConfigError, apply_override, build, check_keys, merge


@dataclass
class DataConfig:
    dataset: str = "synthetic"  # image_folder | cifar10 | cifar100 | stl10 | fashion_mnist | synthetic | webdataset (tar shards) | hf
    root: str | None = None  # dataset directory (webdataset: the shards and _info.json, or their URL; hf: save_to_disk / parquet folder or Hub name); None: the default location
    split: str = "train"
    download: bool = False  # allow torchvision to download (never needed for fashion_mnist on Debian)
    subset: int | None = None  # use a fixed random subset of this many images (quick runs)
    image_size: int = 32
    batch_size: int = 256  # per process; the global batch is batch_size x processes x accumulate_steps
    num_workers: int | None = None  # DataLoader workers; None: from the usable cores (selfsup/hardware.py)
    preset: str | None = None  # view preset; None: the method's own (simclr, moco_v2, mae, ...)
    num_views: int | None = None  # None: the preset's default
    views: dict[str, Any] = field(default_factory=dict)  # view overrides: crop_scale, blur_p, ...
    augment_on: str = "workers"  # workers: per-image torchvision in the DataLoader | device: batched on the training device
    load_size: int | None = None  # augment_on=device: images travel as uint8 squares of this side (None: image_size)
    num_samples: int = 512  # synthetic only
    num_classes: int = 10  # synthetic only


@dataclass
class BackboneConfig:
    name: str = "resnet18_small"  # a registered variant or any timm model name
    kwargs: dict[str, Any] = field(default_factory=dict)  # passed to timm (in_chans, img_size, ...)


@dataclass
class OptimConfig:
    name: str = "sgd"  # sgd (plain momentum) | nesterov | adamw | lars (MoCo v3 / MAE) | lamb | any timm optimizer; unset in pretraining: the method's recipe
    lr: float = 0.3  # base learning rate for a global batch of 256 (see lr_scaling)
    lr_scaling: str = "linear"  # linear: lr * global_batch / 256 | sqrt | none
    weight_decay: float = 1e-4
    weight_decay_end: float | None = None  # cosine from weight_decay to this over the run (DINO, iBOT); None: constant
    momentum: float = 0.9
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_epochs: float = 10.0
    min_lr: float = 0.0
    # after warmup: cosine to min_lr | step: lr x 0.1 at each of lr_milestones (epochs from the start; MoCo's
    # linear probe, facebookresearch/moco main_lincls.py: x 0.1 at epochs 60 and 80)
    schedule: str = "cosine"
    lr_milestones: list[float] = field(default_factory=list)
    exclude_bias_and_norm: bool = True  # no weight decay on biases, norms, pos-embeds, cls tokens
    layer_decay: float | None = None  # layer-wise lr decay (fine-tuning)
    # lr multiplier of every 1-D parameter (biases, norm scales and shifts); null: 1. Barlow Twins' recipe:
    # 0.0048 / 0.2 = 0.024 (facebookresearch/barlowtwins main.py L35-36, L167-168)
    bias_lr_scale: float | None = None
    fused: bool = False  # torch's fused update kernels (sgd, adam, adamw; CUDA and CPU): fewer launches per step
    flood_level: float | None = None  # flooding (Ishida et al. 2020): train on |loss - b| + b; null: off

    def __post_init__(self) -> None:
        # checked here, on the key the user wrote: after batch scaling the optimizer only sees a number
        if not self.lr > 0:
            raise ConfigError(f"optim.lr must be > 0 (the rate for a global batch of 256), got {self.lr}.")
        if self.min_lr < 0:
            raise ConfigError(f"optim.min_lr must be >= 0, got {self.min_lr}.")
        if self.schedule not in ("cosine", "step"):
            raise ConfigError(f"optim.schedule must be cosine or step, got {self.schedule!r}.")
        if self.schedule == "step" and not self.lr_milestones:
            raise ConfigError("optim.schedule=step needs optim.lr_milestones (epochs where the lr drops x 0.1), "
                              "e.g. optim.lr_milestones=[60,80]; or set optim.schedule=cosine.")
        if list(self.lr_milestones) != sorted(self.lr_milestones) or any(m <= 0 for m in self.lr_milestones):
            raise ConfigError(f"optim.lr_milestones must be increasing epochs > 0, got {list(self.lr_milestones)}.")
        if self.weight_decay_end is not None and self.weight_decay_end < 0:
            raise ConfigError(f"optim.weight_decay_end must be >= 0 (or null: constant weight decay), got {self.weight_decay_end}.")
        if self.bias_lr_scale is not None and not self.bias_lr_scale > 0:
            raise ConfigError(f"optim.bias_lr_scale must be > 0 (e.g. 0.024) or null (biases take the weights' lr), got {self.bias_lr_scale}.")
        if self.flood_level is not None and not self.flood_level > 0:
            raise ConfigError(f"optim.flood_level must be > 0 (e.g. 0.05) or null (off), got {self.flood_level}.")


CLIP_GRAD_MODES = ("norm", "per_parameter")


@dataclass
class TrainConfig:
    epochs: int = 100
    max_steps: int | None = None  # stop after this many optimizer steps (overrides epochs)
    accumulate_steps: int = 1
    clip_grad: float | None = None  # max gradient norm
    clip_grad_mode: str = "norm"  # norm: of all gradients together | per_parameter: each on its own (DINO, iBOT)
    precision: str = "auto"  # auto: bf16 on a bf16 GPU or a CPU with native bf16, fp16 on older GPUs, else fp32 | no | bf16 | fp16
    threads: int | None = None  # intra-op CPU threads; None: the usable cores less the DataLoader workers
    seed: int = 0
    output_dir: str = "runs"
    run_name: str | None = None  # None: the config file's stem
    resume: str = "auto"  # auto: continue from the run dir's last checkpoint | never | a path
    checkpoint_every_steps: int = 500
    keep_checkpoints: int = 2
    log_every_steps: int = 10
    trackers: list[str] = field(default_factory=list)  # Accelerate trackers, e.g. [tensorboard]
    compile: bool = False
    channels_last: bool = False
    skip_nonfinite: bool = False  # skip steps whose loss is NaN/Inf instead of stopping

    def __post_init__(self) -> None:
        if self.clip_grad_mode not in CLIP_GRAD_MODES:
            raise ConfigError(f"train.clip_grad_mode must be one of {', '.join(CLIP_GRAD_MODES)}, got {self.clip_grad_mode!r}.")


FINAL_EVALUATIONS = ("knn", "linear_probe")


@dataclass
class EvalConfig:
    every_epochs: int = 0  # kNN monitor period; 0: only at the end
    at_end: bool = True
    dataset: str | None = None  # labelled dataset for the monitor; None: data.dataset
    root: str | None = None
    train_split: str = "train"
    test_split: str = "test"
    knn_k: int = 200
    knn_temperature: float = 0.1
    max_train_samples: int | None = 10000  # at most this many (a fixed random subset); a smaller set is used whole
    max_test_samples: int | None = 2000
    batch_size: int = 256
    random_init_baseline: bool = False  # at the end, also score the same backbone at random init
    pixel_baseline: bool = False  # at the end, also score raw pixels (the eval transform's tensors) the same way
    # An image_folder without train/ and test/ sub-folders: this part of every class is held out as the
    # test set (stratified, fixed by holdout_seed, not train.seed), so evaluation never scores a training image.
    holdout_fraction: float = 0.2
    holdout_seed: int = 0
    # What the end of the run (eval.at_end) reports on the final encoder, each beside the baselines above:
    # knn (the monitor's figure) and linear_probe (a logistic regression on the same cached features,
    # fit by L-BFGS: a few seconds at the quickstart's 5 000 images). Also written to report.md / report.html.
    final: list[str] = field(default_factory=lambda: ["knn", "linear_probe"])

    def __post_init__(self) -> None:
        if not 0.0 < self.holdout_fraction < 1.0:
            raise ConfigError(f"eval.holdout_fraction must be in (0, 1) (e.g. 0.2), got {self.holdout_fraction}.")
        unknown = [name for name in self.final if name not in FINAL_EVALUATIONS]
        if unknown:
            close = difflib.get_close_matches(unknown[0], FINAL_EVALUATIONS, n=1, cutoff=0.4)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"eval.final {unknown[0]!r} is not one of {', '.join(FINAL_EVALUATIONS)}.{hint}")


FINETUNE_MODES = ("frozen", "full", "discriminative", "layer_decay")


@dataclass
class ProbeConfig:
    """tools/linear_probe.py: a linear classifier on the frozen encoder (MoCo / MAE protocols)."""

    cache_features: bool = True  # features computed once without augmentation; False: augmented images every epoch
    batch_norm: bool = False  # MAE: a BatchNorm without affine parameters before the linear layer
    zero_init: bool = False  # the linear layer starts at 0 (SimCLR's --zero_init_logits_layer), else N(0, 0.01)
    # whose protocol sets the recipe (tools/linear_probe.py --protocol): moco | moco_v3 | mae | simclr;
    # None: the family of the method that trained the encoder (selfsup/probe_protocols.py)
    protocol: str | None = None


@dataclass
class FinetuneConfig:
    """tools/finetune.py: which weights train and at what rate, and the regularisers of the recipe.

    The regularisers are off by default on purpose (short runs on small datasets); MAE's ViT-B recipe uses
    label_smoothing 0.1, mixup 0.8, cutmix 1.0, drop_path_rate 0.1 (docs/recipes.md).
    """

    mode: str = "full"  # frozen | full | discriminative | layer_decay (the latter uses optim.layer_decay)
    backbone_lr_scale: float = 0.1  # discriminative: backbone lr = head lr x this
    label_smoothing: float = 0.0
    mixup: float = 0.0  # Mixup alpha (0: off)
    cutmix: float = 0.0  # CutMix alpha (0: off)
    drop_path_rate: float = 0.0  # stochastic depth of the backbone
    ema_decay: float | None = None  # EMA of the weights (timm ModelEmaV3), evaluated alongside; e.g. 0.999
    # SWA (Izmailov et al. 2018): from this epoch (0-based) on, SWA's lr and a snapshot at each epoch's end; null: off
    swa_start_epoch: int | None = None
    swa_lr: float | None = None  # SWA lr per 256 images (scaled like optim.lr); null: optim.lr / 2
    swa_schedule: str = "constant"  # constant (cosine anneal to swa_lr, then flat) | cyclic (optim.lr -> swa_lr each epoch)
    swa_anneal_epochs: float = 1.0  # constant: epochs of the cosine anneal from the schedule's rate to swa_lr

    def __post_init__(self) -> None:
        if self.mode not in FINETUNE_MODES:
            close = difflib.get_close_matches(self.mode, FINETUNE_MODES, n=1, cutoff=0.4)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"finetune.mode {self.mode!r} is not one of {', '.join(FINETUNE_MODES)}.{hint}")
        if not 0.0 < self.backbone_lr_scale:
            raise ConfigError(f"finetune.backbone_lr_scale must be > 0, got {self.backbone_lr_scale}; use --mode frozen for 0.")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"finetune.label_smoothing must be in [0, 1), got {self.label_smoothing}.")
        if self.mixup < 0 or self.cutmix < 0:
            raise ConfigError("finetune.mixup and finetune.cutmix are Beta alphas: 0 (off) or > 0.")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ConfigError(f"finetune.drop_path_rate must be in [0, 1), got {self.drop_path_rate}.")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ConfigError(f"finetune.ema_decay must be in (0, 1) (e.g. 0.999) or null, got {self.ema_decay}.")
        if self.swa_start_epoch is not None and self.swa_start_epoch < 0:
            raise ConfigError(f"finetune.swa_start_epoch must be >= 0 (e.g. 3 of 4 epochs) or null (off), got {self.swa_start_epoch}.")
        if self.swa_lr is not None and not self.swa_lr > 0:
            raise ConfigError(f"finetune.swa_lr must be > 0 (per 256 images, like optim.lr) or null (optim.lr / 2), got {self.swa_lr}.")
        if self.swa_schedule not in ("constant", "cyclic"):
            raise ConfigError(f"finetune.swa_schedule must be constant or cyclic, got {self.swa_schedule!r}.")
        if self.swa_anneal_epochs < 0:
            raise ConfigError(f"finetune.swa_anneal_epochs must be >= 0 (0: jump to swa_lr), got {self.swa_anneal_epochs}.")


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    method: Any = None  # the method's own Config dataclass, chosen by method.name
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    source: str | None = None  # the file it was loaded from (not a user key)


SECTIONS = ("data", "backbone", "method", "optim", "train", "eval", "probe", "finetune")


def load_config(
    path: str | Path | None,
    overrides: list[str] | tuple[str, ...] = (),
    defaults: dict[str, Any] | None = None,
) -> Config:
    """Read YAML, apply `a.b=value` overrides, and validate every key and type.

    `defaults` (a nested dict, e.g. a tool's own recipe) sits under the file: file and overrides win.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"Config file {str(path)!r} not found; pass an existing YAML file to --config.")
        raw = _read_yaml(path)
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping with sections {', '.join(SECTIONS)}.")
    if defaults:
        raw = merge(defaults, raw)
    for item in overrides:
        apply_override(raw, item)
    cfg = from_dict(raw)
    cfg.source = str(path) if path is not None else None
    return cfg


def _read_yaml(path: Path) -> Any:
    """The parsed file; a syntax error becomes one ConfigError naming the file, line and column."""
    try:
        return yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        context, context_mark = getattr(e, "context", None), getattr(e, "context_mark", None)
        if context and context_mark is not None and mark is not None and context_mark.line != mark.line:
            context = f"{context} started at line {context_mark.line + 1}"
        problem = ", ".join(str(p) for p in (context, getattr(e, "problem", None)) if p) or type(e).__name__
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "somewhere"
        raise ConfigError(
            f"{path}: YAML syntax error at {where}: {problem}. Fix the file there "
            "(indentation, a missing ':', an unclosed bracket or quote)."
        ) from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path} is not a UTF-8 text file ({e}); pass a YAML file to --config.") from None


def from_dict(raw: dict[str, Any]) -> Config:
    """Build a validated Config from a plain nested dict."""
    check_keys(raw, SECTIONS, "")
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(Config):
        if f.name not in raw or f.name == "method":
            continue
        kwargs[f.name] = build(f.type if not isinstance(f.type, str) else _CONFIG_TYPES[f.name], raw[f.name], f.name)
    method_raw = raw.get("method") or {}
    if not isinstance(method_raw, dict):
        raise ConfigError("'method' must be a mapping with at least 'name' (simclr, moco, mae, simmim or module:Class).")
    kwargs["method"] = build_method_config(method_raw)
    optim_raw = raw.get("optim") or {}
    if isinstance(optim_raw, dict) and "name" not in optim_raw:
        # No optimizer named: the method's own recipe (e.g. AdamW for a MoCo v3 ViT, LARS for a ResNet)
        # supplies name, lr, weight decay, betas; whatever the file or overrides set still wins.
        backbone = kwargs.get("backbone", BackboneConfig())
        recipe = _method_class(kwargs["method"]).optim_defaults(kwargs["method"], backbone.name, backbone.kwargs)
        kwargs["optim"] = build(OptimConfig, {**recipe, **optim_raw}, "optim")
    return Config(**kwargs)


def _method_class(method_cfg: Any) -> type:
    from selfsup.methods import get_method_class

    return get_method_class(method_cfg.name)


def build_method_config(raw: dict[str, Any]) -> Any:
    """Validate the `method` section against the Config dataclass of the method it names."""
    from selfsup.methods import get_method_class  # lazy: methods import the shared modules, not config

    name = raw.get("name", "simclr")
    method_cls = get_method_class(name)
    try:
        return build(method_cls.Config, {**raw, "name": name}, "method")
    except ConfigError as e:
        owners = _methods_with_keys(set(raw) - {f.name for f in dataclasses.fields(method_cls.Config)})
        if owners:
            raise ConfigError(f"{e} This looks like a config for method {' / '.join(owners)}, not {name!r}: "
                              f"set method.name accordingly or remove those keys.") from e
        raise


def _methods_with_keys(keys: set[str]) -> list[str]:
    """Built-in methods whose config has all of `keys` (to recognise a config written for another method)."""
    from selfsup.methods import BUILTIN_METHODS, get_method_class

    if not keys:
        return []
    owners = []
    for other in BUILTIN_METHODS:
        try:
            fields = {f.name for f in dataclasses.fields(get_method_class(other).Config)}
        except (ValueError, ImportError):
            continue
        if keys <= fields:
            owners.append(other)
    return owners


def to_dict(obj: Any) -> Any:
    """Plain YAML-able structure of a config (tuples become lists)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.name != "source"}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


# ---------------------------------------------------------------------------------------------
# validation

_CONFIG_TYPES = {
    "data": DataConfig,
    "backbone": BackboneConfig,
    "optim": OptimConfig,
    "train": TrainConfig,
    "eval": EvalConfig,
    "probe": ProbeConfig,
    "finetune": FinetuneConfig,
}
