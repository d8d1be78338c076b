"""Encoder export and load in timm's own Hub format, plus this project's metadata beside it.

An encoder directory holds
- `model.safetensors`: the backbone's own state dict (timm key names);
- `config.json`: timm's Hub schema (architecture, num_classes, num_features, model_args, pretrained_cfg with
  input_size / mean / std / interpolation / crop_pct), written by timm's own `save_config_for_hf` as
  `timm.models.save_for_hf` writes it, so `timm.create_model("local-dir:DIR", pretrained=True)` and
  `timm.data.resolve_data_config({}, model=model)` work without this project (registry ViTs; the small-stem
  ResNets need `import selfsup.backbones`, as timm has no 3x3 stride-1 stem without max-pool);
- `selfsup.json`: how selfsup rebuilds it (backbone name and kwargs) and what made it (method, run, data).

`load_encoder` accepts that layout, the one before it (version 1: our metadata in `config.json`), a plain
timm Hub folder (`config.json` + `model.safetensors`), a run directory, or a training checkpoint directory.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from selfsup.backbones import create_backbone

FORMAT = "selfsup-encoder"
VERSION = 2
WEIGHTS = "model.safetensors"
TIMM_CONFIG = "config.json"  # timm's Hub schema (in version 1: our own metadata, under this same name)
META = "selfsup.json"


class EncoderLoadError(ValueError):
    """The path given as an encoder is not one, or does not match its architecture."""


def save_encoder(encoder: nn.Module, directory: str | Path, **extra: Any) -> Path:
    """Write weights, timm's config.json and selfsup.json; `extra` (method, run, data...) goes in selfsup.json.

    `extra["data"]` (image_size, mean, std, in_chans, dataset) becomes timm's pretrained_cfg, so timm's
    data pipeline resolves the size and statistics the encoder was trained with.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()}
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "backbone": {"name": encoder.backbone_name, "kwargs": encoder.backbone_kwargs},
        "embed_dim": encoder.embed_dim,
        "patch_size": getattr(encoder, "patch_size", None),
        **extra,
    }
    tmp = directory / f".{WEIGHTS}.tmp"
    save_file(state, str(tmp), metadata={"format": "pt"})
    tmp.replace(directory / WEIGHTS)
    _write_atomic(directory / TIMM_CONFIG, lambda file: write_timm_config(encoder, file, extra.get("data") or {},
                                                                          method=extra.get("method")))
    _write_atomic(directory / META, lambda file: file.write_text(json.dumps(meta, indent=2, default=_jsonable)))
    return directory


def write_timm_config(encoder: nn.Module, file: Path, data: dict[str, Any], method: str | None = None) -> None:
    """timm's config.json for `encoder`, through timm's own writer (what `timm.models.save_for_hf` calls)."""
    from timm.models._hub import save_config_for_hf  # not re-exported by timm.models

    if not hasattr(encoder, "pretrained_cfg"):
        raise EncoderLoadError(
            f"backbone {getattr(encoder, 'backbone_name', type(encoder).__name__)!r} is not a timm model "
            "(no pretrained_cfg); a registered backbone factory must return one built by timm.create_model."
        )
    model_args = None if hasattr(encoder, "_model_args") else _serialisable(encoder.timm_kwargs)
    save_config_for_hf(encoder, str(file), model_config=timm_model_config(method), model_args=model_args,
                       data_config=timm_data_config(encoder, data))


def timm_model_config(method: str | None) -> dict[str, Any]:
    """Ours, not the weights the architecture's default tag names (e.g. augreg_in21k_ft_in1k) nor their licence."""
    return {"pretrained_cfg": {"tag": f"selfsup_{method}" if method else "selfsup", "license": None}}


def timm_data_config(encoder: nn.Module, data: dict[str, Any]) -> dict[str, Any]:
    """timm's data config for the training data: input size, the dataset's mean/std, our eval resize as crop_pct."""
    from selfsup.transforms import eval_resize_size

    out: dict[str, Any] = {"interpolation": "bilinear"}  # torchvision v2.Resize's default, what the eval transform uses
    channels = int(data.get("in_chans") or encoder.backbone_kwargs.get("in_chans") or getattr(encoder, "in_chans", 3))
    mean, std = data.get("mean"), data.get("std")
    if (mean is None or std is None) and data.get("dataset"):
        from selfsup.data import dataset_info

        try:
            info = dataset_info(data["dataset"])
            mean, std = (info.mean if mean is None else mean), (info.std if std is None else std)
        except ValueError:
            pass
    if mean is not None and std is not None:
        # grayscale statistics fed to an RGB encoder are broadcast, as build_eval_transform does
        out["mean"] = tuple(float(m) for m in (list(mean) * channels if len(mean) == 1 else mean))
        out["std"] = tuple(float(s) for s in (list(std) * channels if len(std) == 1 else std))
    if data.get("image_size"):
        size = int(data["image_size"])
        out["input_size"] = (channels, size, size)
        resize = eval_resize_size(size)
        # timm resizes to floor(size / crop_pct): nudge below size / resize so that floor gives our resize exactly
        crop_pct = 1.0 if resize == size else size / resize
        if math.floor(size / crop_pct) != resize:
            crop_pct = size / (resize + 1e-6)
        out["crop_pct"] = crop_pct
    return out


def load_encoder(path: str | Path, *, map_location: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild an exported encoder (or the encoder inside a run / checkpoint) with its weights."""
    path = Path(path)
    if not path.exists():
        raise EncoderLoadError(f"Encoder path {str(path)!r} does not exist; pass RUN/encoder, a run directory or a checkpoint.")
    if path.is_file():
        raise EncoderLoadError(
            f"{str(path)!r} is a file; pass the directory holding {WEIGHTS} and {TIMM_CONFIG} (e.g. runs/<run>/encoder)."
        )
    if _is_encoder_dir(path):
        return _load_encoder_dir(path, map_location)
    if _is_encoder_dir(path / "encoder"):  # a run directory
        return _load_encoder_dir(path / "encoder", map_location)
    if (path / WEIGHTS).is_file() and (path / "trainer_state.json").is_file():  # a training checkpoint
        return _load_from_checkpoint(path, map_location)
    if (path / "checkpoints").is_dir():  # a run that was never exported: its last checkpoint
        from selfsup.checkpoints import list_checkpoints

        found = list_checkpoints(path / "checkpoints")
        if found:
            return _load_from_checkpoint(found[-1], map_location)
    raise EncoderLoadError(
        f"{str(path)!r} holds no encoder: expected {TIMM_CONFIG} + {WEIGHTS} (an exported encoder), a run directory "
        "with encoder/ or checkpoints/, or a checkpoint directory. Export one with tools/export.py."
    )


def _is_encoder_dir(directory: Path) -> bool:
    return (directory / META).is_file() or (directory / TIMM_CONFIG).is_file()


def _read_json(file: Path) -> dict[str, Any]:
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise EncoderLoadError(f"{file} is not valid JSON ({e}); re-export the encoder.") from e


def _load_encoder_dir(directory: Path, map_location) -> tuple[nn.Module, dict[str, Any]]:
    if (directory / META).is_file():  # version 2: selfsup.json beside timm's config.json
        meta = _read_json(directory / META)
        if meta.get("format") != FORMAT:
            raise EncoderLoadError(
                f"{directory / META} is not a selfsup encoder record (format={meta.get('format')!r}); "
                "pass a directory written by selfsup's export."
            )
    else:
        hub = _read_json(directory / TIMM_CONFIG)
        if hub.get("format") == FORMAT:  # version 1: our metadata under timm's file name
            meta = hub
        elif "architecture" in hub:  # a plain timm Hub folder (e.g. saved by timm.models.save_for_hf)
            meta = _meta_from_timm_config(hub)
        else:
            raise EncoderLoadError(
                f"{directory / TIMM_CONFIG} is neither timm's Hub config (no 'architecture') nor a selfsup encoder "
                "record; pass a directory written by selfsup's export or by timm.models.save_for_hf."
            )
    backbone = meta["backbone"]
    encoder = create_backbone(backbone["name"], **backbone.get("kwargs", {}))
    state = _read_safetensors(directory / WEIGHTS, map_location)
    _load_state(encoder, state, directory / WEIGHTS)
    return encoder, meta


def _meta_from_timm_config(hub: dict[str, Any]) -> dict[str, Any]:
    """selfsup's view of a timm Hub folder: the architecture headless, the input size and statistics it names."""
    kwargs = {k: v for k, v in hub.get("model_args", {}).items() if k != "num_classes"}
    if hub.get("num_classes", 0) != 0:
        raise EncoderLoadError(
            f"the timm model in this folder has a {hub['num_classes']}-class head; selfsup encoders are headless "
            "(num_classes=0). Save it with model.reset_classifier(0) first."
        )
    cfg = hub.get("pretrained_cfg", {})
    size = cfg.get("input_size")
    data = {"image_size": size[-1], "in_chans": size[0]} if size else {}
    data.update({k: cfg[k] for k in ("mean", "std") if k in cfg})
    return {"format": "timm-hub", "backbone": {"name": hub["architecture"], "kwargs": kwargs}, "data": data}


def _load_from_checkpoint(ckpt: Path, map_location) -> tuple[nn.Module, dict[str, Any]]:
    """A checkpoint holds the whole method; its encoder's keys are those under the method's `encoder_key`
    (`encoder.`; DINO / iBOT: `backbone.` or `teacher_backbone.`, as `method.export` chose)."""
    from selfsup.config import load_config
    from selfsup.methods import get_method_class

    run_dir = ckpt.parent.parent
    config_file = run_dir / "config.yaml"
    if not config_file.is_file():
        raise EncoderLoadError(f"Checkpoint {ckpt} has no {config_file} beside its run; cannot tell the backbone.")
    cfg = load_config(config_file)
    encoder = create_backbone(cfg.backbone.name, **cfg.backbone.kwargs)
    full = _read_safetensors(ckpt / WEIGHTS, map_location)
    prefix = get_method_class(cfg.method.name).encoder_key(cfg.method) + "."
    state = {k[len(prefix):]: v for k, v in full.items() if k.startswith(prefix)}
    _load_state(encoder, state, ckpt / WEIGHTS)
    meta = {
        "format": FORMAT,
        "backbone": {"name": cfg.backbone.name, "kwargs": cfg.backbone.kwargs},
        "method": cfg.method.name,
        **({"variant": cfg.method.variant} if getattr(cfg.method, "variant", None) else {}),
        "data": {"dataset": cfg.data.dataset, "image_size": cfg.data.image_size},
        "checkpoint": str(ckpt),
    }
    return encoder, meta


def _read_safetensors(file: Path, map_location) -> dict[str, torch.Tensor]:
    if not file.is_file():
        raise EncoderLoadError(f"{file} is missing; the encoder directory is incomplete. Re-export it.")
    try:
        return load_file(str(file), device=str(map_location))
    except (SafetensorError, OSError, ValueError) as e:
        raise EncoderLoadError(f"{file} is not a readable safetensors file ({e}); re-export the encoder.") from e


def _load_state(encoder: nn.Module, state: dict[str, torch.Tensor], source: Path) -> None:
    expected = encoder.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        detail = "; ".join(
            part
            for part in (
                f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}" if missing else "",
                f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}" if unexpected else "",
                "shape mismatch " + ", ".join(f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}" for k in wrong[:5]) if wrong else "",
            )
            if part
        )
        raise EncoderLoadError(
            f"The weights in {source} do not fit the backbone {getattr(encoder, 'backbone_name', type(encoder).__name__)!r} "
            f"described beside them ({detail}). The file and its config.json disagree: re-export the encoder, "
            "or pass the matching backbone name and kwargs."
        )
    encoder.load_state_dict(state)


def _write_atomic(file: Path, write) -> None:
    tmp = file.with_name(f".{file.name}.tmp")
    write(tmp)
    tmp.replace(file)


def _serialisable(kwargs: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(kwargs, default=_jsonable))


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, (tuple, set)):
        return list(obj)
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    return str(obj)
