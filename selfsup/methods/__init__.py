"""Method registry: built-in methods by name, or any `module:Class` a user names in the config."""

from __future__ import annotations

import difflib
import importlib

from selfsup.methods.base import Method, StepOutput

# name -> "module:Class"; imported on first use so a method's dependencies load only when chosen.
BUILTIN_METHODS = {
    "simclr": "selfsup.methods.simclr:SimCLR",
    "mae": "selfsup.methods.mae:MAE",
    "simmim": "selfsup.methods.simmim:SimMIM",
    "moco": "selfsup.methods.moco:MoCo",
    "dino": "selfsup.methods.dino:DINO",
    "ibot": "selfsup.methods.ibot:IBOT",
    "byol": "selfsup.methods.byol:BYOL",
    "barlow_twins": "selfsup.methods.barlow_twins:BarlowTwins",
    "vicreg": "selfsup.methods.vicreg:VICReg",
}


def get_method_class(name: str) -> type[Method]:
    """Resolve a method name (`simclr`) or an import path (`my_pkg.my_method:MyMethod`)."""
    target = BUILTIN_METHODS.get(name, name)
    if ":" not in target:
        close = difflib.get_close_matches(name, list(BUILTIN_METHODS), n=1, cutoff=0.4)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ValueError(
            f"Unknown method {name!r}.{hint} Built-in methods: {', '.join(BUILTIN_METHODS)}; "
            "a method of your own is named as 'module.path:ClassName'."
        )
    module_name, class_name = target.split(":", 1)
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"Method {name!r}: cannot import module {module_name!r} ({e}). Is it on PYTHONPATH?") from e
    cls = getattr(module, class_name, None)
    if cls is None or not (isinstance(cls, type) and issubclass(cls, Method)):
        raise ValueError(f"Method {name!r}: {module_name}.{class_name} is not a subclass of selfsup.methods.Method.")
    return cls


def build_method(method_cfg, backbone) -> Method:
    """Instantiate the method a validated `cfg.method` section names, around `backbone`."""
    return get_method_class(method_cfg.name)(backbone, method_cfg)


__all__ = ["BUILTIN_METHODS", "Method", "StepOutput", "build_method", "get_method_class"]
