"""Encoder export and load: `model.safetensors` (the backbone's own state dict, timm key names)
plus `config.json` (how to rebuild it, in selfsup and in plain timm, and the data it was trained on).

`load_encoder` accepts an encoder directory, a run directory, or a training checkpoint directory.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from selfsup.backbones import create_backbone

FORMAT = "selfsup-encoder"
WEIGHTS = "model.safetensors"
META = "config.json"


class EncoderLoadError(ValueError):
    """The path given as an encoder is not one, or does not match its architecture."""


def save_encoder(encoder: nn.Module, directory: str | Path, **extra: Any) -> Path:
    """Write the backbone weights and the JSON sidecar; `extra` (method, data stats...) goes in the JSON."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()}
    meta = {
        "format": FORMAT,
        "version": 1,
        "backbone": {"name": encoder.backbone_name, "kwargs": encoder.backbone_kwargs},
        # plain timm: timm.create_model(timm.model_name, num_classes=0, **timm.kwargs) + load_state_dict
        "timm": {"model_name": encoder.timm_name, "kwargs": encoder.timm_kwargs},
        "embed_dim": encoder.embed_dim,
        "patch_size": getattr(encoder, "patch_size", None),
        **extra,
    }
    tmp = directory / f".{WEIGHTS}.tmp"
    save_file(state, str(tmp), metadata={"format": "pt"})
    tmp.replace(directory / WEIGHTS)
    (directory / META).write_text(json.dumps(meta, indent=2, default=_jsonable))
    return directory


def load_encoder(path: str | Path, *, map_location: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild an exported encoder (or the encoder inside a run / checkpoint) with its weights."""
    path = Path(path)
    if not path.exists():
        raise EncoderLoadError(f"Encoder path {str(path)!r} does not exist; pass RUN/encoder, a run directory or a checkpoint.")
    if path.is_file():
        raise EncoderLoadError(
            f"{str(path)!r} is a file; pass the directory holding {WEIGHTS} and {META} (e.g. runs/<run>/encoder)."
        )
    if (path / META).is_file():
        return _load_encoder_dir(path, map_location)
    if (path / "encoder" / META).is_file():  # a run directory
        return _load_encoder_dir(path / "encoder", map_location)
    if (path / WEIGHTS).is_file() and (path / "trainer_state.json").is_file():  # a training checkpoint
        return _load_from_checkpoint(path, map_location)
    if (path / "checkpoints").is_dir():  # a run that was never exported: its last checkpoint
        from selfsup.checkpoints import list_checkpoints

        found = list_checkpoints(path / "checkpoints")
        if found:
            return _load_from_checkpoint(found[-1], map_location)
    raise EncoderLoadError(
        f"{str(path)!r} holds no encoder: expected {META} + {WEIGHTS} (an exported encoder), a run directory "
        "with encoder/ or checkpoints/, or a checkpoint directory. Export one with tools/export.py."
    )


def _load_encoder_dir(directory: Path, map_location) -> tuple[nn.Module, dict[str, Any]]:
    try:
        meta = json.loads((directory / META).read_text())
    except json.JSONDecodeError as e:
        raise EncoderLoadError(f"{directory / META} is not valid JSON ({e}); re-export the encoder.") from e
    if meta.get("format") != FORMAT:
        raise EncoderLoadError(
            f"{directory / META} is not a selfsup encoder sidecar (format={meta.get('format')!r}); "
            "pass a directory written by selfsup's export."
        )
    backbone = meta["backbone"]
    encoder = create_backbone(backbone["name"], **backbone.get("kwargs", {}))
    state = _read_safetensors(directory / WEIGHTS, map_location)
    _load_state(encoder, state, directory / WEIGHTS)
    return encoder, meta


def _load_from_checkpoint(ckpt: Path, map_location) -> tuple[nn.Module, dict[str, Any]]:
    """A checkpoint holds the whole method; its encoder's keys are those under `encoder.`."""
    from selfsup.config import load_config

    run_dir = ckpt.parent.parent
    config_file = run_dir / "config.yaml"
    if not config_file.is_file():
        raise EncoderLoadError(f"Checkpoint {ckpt} has no {config_file} beside its run; cannot tell the backbone.")
    cfg = load_config(config_file)
    encoder = create_backbone(cfg.backbone.name, **cfg.backbone.kwargs)
    full = _read_safetensors(ckpt / WEIGHTS, map_location)
    state = {k[len("encoder."):]: v for k, v in full.items() if k.startswith("encoder.")}
    _load_state(encoder, state, ckpt / WEIGHTS)
    meta = {
        "format": FORMAT,
        "backbone": {"name": cfg.backbone.name, "kwargs": cfg.backbone.kwargs},
        "method": cfg.method.name,
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


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, (tuple, set)):
        return list(obj)
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    return str(obj)
