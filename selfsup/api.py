"""The Python API, for a notebook or a script: pretrain a config, evaluate an encoder.

    import selfsup
    run = selfsup.pretrain("configs/quickstart.yaml", train__max_steps=50)
    selfsup.evaluate(run, "fashion_mnist", protocol="knn")          # {'top1': ..., 'top5': ..., ...}

Overrides are keyword arguments whose double underscores stand for the dots of a command line's
overrides (`optim__lr=0.3` is `optim.lr=0.3`); a key with a dot in it (`backbone.kwargs.in_chans`) goes in
`overrides={...}`. Both run exactly what `selfsup-pretrain` / `selfsup-knn` ... run, in this process.
"""

from __future__ import annotations

import functools
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from selfsup.config import Config, ConfigError, load_config, to_dict

PROTOCOLS = ("knn", "linear_probe", "finetune")


@dataclass
class Run:
    """A finished pretraining run: its directory, summary (as summary.json) and resolved config."""

    run_dir: Path
    summary: dict[str, Any]
    config: Config | None = field(default=None, repr=False)

    @functools.cached_property
    def encoder(self):
        """The exported encoder (loaded on first access): an nn.Module, forward(x: [B, C, H, W]) -> [B, D]."""
        from selfsup.export import load_encoder

        return load_encoder(self.run_dir / "encoder")[0]

    @classmethod
    def load(cls, run_dir: str | Path) -> "Run":
        """A run already on disk (its summary.json and config.yaml)."""
        run_dir = Path(run_dir)
        summary_file = run_dir / "summary.json"
        if not summary_file.is_file():
            raise FileNotFoundError(f"{summary_file} not found: {run_dir} is not a finished pretraining run.")
        config = load_config(run_dir / "config.yaml") if (run_dir / "config.yaml").is_file() else None
        return cls(run_dir, json.loads(summary_file.read_text()), config)


def pretrain(config: str | Path | dict[str, Any] | Config, overrides: dict[str, Any] | None = None,
             **keyword_overrides: Any) -> Run:
    """Pretrain as `selfsup-pretrain --config CONFIG key=value ...` would; returns the finished Run.

    `config`: a YAML path, a nested dict with the YAML's sections, or a Config. Overrides: `optim__lr=0.3`
    (double underscore = dot) and/or `overrides={"optim.lr": 0.3}`.
    """
    from selfsup.cli.pretrain import run_pretraining

    cfg = resolve_config(config, overrides, keyword_overrides)
    summary = run_pretraining(cfg)
    return Run(Path(summary["run_dir"]), summary, cfg)


def resolve_config(config: str | Path | dict[str, Any] | Config, overrides: dict[str, Any] | None = None,
                   keyword_overrides: dict[str, Any] | None = None) -> Config:
    """The validated Config of a path / dict / Config plus dotted and double-underscore overrides."""
    items = dotted_overrides(overrides, keyword_overrides)
    if isinstance(config, Config):
        return load_config(None, items, defaults=to_dict(config))
    if isinstance(config, dict):
        return load_config(None, items, defaults=config)
    if isinstance(config, (str, Path)):
        return load_config(config, items)
    raise TypeError(f"config must be a YAML path, a dict or a selfsup Config, not {type(config).__name__}")


def dotted_overrides(overrides: dict[str, Any] | None, keyword_overrides: dict[str, Any] | None) -> list[str]:
    """`{"optim.lr": 0.3}` and `optim__lr=0.3` -> ["optim.lr=0.3"] (values as JSON, which YAML reads back)."""
    items = dict(overrides or {})
    for key, value in (keyword_overrides or {}).items():
        if "__" not in key:
            raise ConfigError(f"override {key}={value!r} names no section; write section__key (e.g. optim__lr=0.3, "
                              "train__max_steps=100) or overrides={{'section.key': value}}.")
        items[key.replace("__", ".")] = value
    return [f"{key}={json.dumps(value)}" for key, value in items.items()]


def evaluate(encoder: Any, dataset: str | None = None, protocol: str = "knn", *, root: str | Path | None = None,
             image_size: int | None = None, max_train: int | None = None, max_test: int | None = None,
             config: str | Path | None = None, output_dir: str | Path | None = None,
             overrides: dict[str, Any] | None = None, **keyword_overrides: Any) -> dict[str, Any]:
    """Score an encoder as `selfsup-knn` / `selfsup-linear-probe` / `selfsup-finetune` would; returns its result
    (top1, top5, ...; also written to result.json in the run directory).

    `encoder`: a Run, an encoder / run / checkpoint directory, a backbone name (random init), "pixels", or a
    module made by selfsup (create_backbone / load_encoder; saved to a temporary directory first).
    `dataset`: a dataset name (default: the one the encoder was trained on). Overrides as in `pretrain`.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol {protocol!r} is not one of {', '.join(PROTOCOLS)}")
    import importlib

    tool = importlib.import_module(f"selfsup.cli.{protocol}").main.__wrapped__  # raises, rather than exiting
    with tempfile.TemporaryDirectory(prefix="selfsup_evaluate_") as tmp:
        spec = _encoder_spec(encoder, Path(tmp), dataset, image_size)
        argv = ["--encoder", spec]
        for flag, value in (("--dataset", dataset), ("--root", root), ("--image-size", image_size),
                            ("--max-train", max_train), ("--max-test", max_test), ("--config", config)):
            if value is not None:
                argv += [flag, str(value)]
        if output_dir is None and spec.startswith(tmp):  # a module: no run of its own to name the directory after
            output_dir = Path(tmp) / protocol
        if output_dir is not None:
            argv += ["--output-dir", str(output_dir)]
        return tool(argv + dotted_overrides(overrides, keyword_overrides))


def _encoder_spec(encoder: Any, tmp: Path, dataset: str | None, image_size: int | None) -> str:
    if isinstance(encoder, Run):
        return str(encoder.run_dir / "encoder")
    if isinstance(encoder, (str, Path)):
        return str(encoder)
    if hasattr(encoder, "backbone_name") and hasattr(encoder, "state_dict"):
        from selfsup.export import save_encoder

        data = {k: v for k, v in (("dataset", dataset), ("image_size", image_size)) if v is not None}
        return str(save_encoder(encoder, tmp / "encoder", data=data))
    raise TypeError(
        f"encoder must be a Run, a path, a backbone name or a module built by selfsup.create_backbone / load_encoder, "
        f"not {type(encoder).__name__}"
    )
