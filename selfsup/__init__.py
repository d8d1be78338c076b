"""selfsup: self-supervised pretraining for vision (SimCLR, MoCo, MAE, SimMIM) on one Accelerate engine.

    import selfsup
    run = selfsup.pretrain("configs/quickstart.yaml", train__max_steps=50)   # -> selfsup.Run
    selfsup.evaluate(run, "fashion_mnist", protocol="knn")

`import selfsup` stays light: the names below (and torch with them) load on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "pretrain": "selfsup.api",
    "evaluate": "selfsup.api",
    "Run": "selfsup.api",
    "load_encoder": "selfsup.export",
    "save_encoder": "selfsup.export",
    "create_backbone": "selfsup.backbones",
    "load_config": "selfsup.config",
}
__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # once
        return value
    raise AttributeError(f"module 'selfsup' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
