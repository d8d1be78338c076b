"""Nested dicts to typed dataclasses, for selfsup.config: merge, dotted overrides, coercion to the annotations,
and errors that name the key, the closest valid one and the fix.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import types
import typing
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config problem the user can fix; the message names the key and the fix."""


def merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """A new nested dict with `top`'s values over `base`'s (mappings merged key by key); neither is modified."""
    out = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def check_keys(raw: dict[str, Any], valid: tuple[str, ...] | list[str], where: str) -> None:
    for key in raw:
        if key not in valid:
            full = f"{where}.{key}" if where else key
            close = difflib.get_close_matches(str(key), list(valid), n=1, cutoff=0.5)
            hint = f" Did you mean '{where + '.' if where else ''}{close[0]}'?" if close else ""
            scope = f"'{where}'" if where else "the top level"
            raise ConfigError(f"Unknown config key '{full}'.{hint} Valid keys in {scope}: {', '.join(valid)}.")


def build(cls: type, raw: Any, where: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"'{where}' must be a mapping of keys to values, got {type(raw).__name__} {raw!r}.")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    check_keys(raw, [n for n in fields if n != "source"], where)
    hints = typing.get_type_hints(cls)
    values = {name: _coerce(value, hints[name], f"{where}.{name}") for name, value in raw.items()}
    return cls(**values)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; accept the obvious conversions (int -> float, '1e-3')."""
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                pass
        raise _type_error(key, value, tp)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise _type_error(key, value, tp)
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"'{key}' needs {len(args)} values ({_type_name(tp)}), got {value!r}.")
            return tuple(_coerce(v, a, key) for v, a in zip(value, args))
        item = args[0] if args else Any
        out = [_coerce(v, item, key) for v in value]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise _type_error(key, value, tp)
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return build(tp, value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _type_error(key, value, tp)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise _type_error(key, value, tp)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML 1.1 reads 1e-3 as a string
            except ValueError:
                pass
        raise _type_error(key, value, tp)
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, bool):  # YAML 1.1 reads a bare no / yes (train.precision=no) as a boolean
            return "yes" if value else "no"
        raise _type_error(key, value, tp)
    return value


def _type_error(key: str, value: Any, tp: Any) -> ConfigError:
    return ConfigError(
        f"Config key '{key}' expects {_type_name(tp)}, got {type(value).__name__} {value!r}. "
        f"Fix the value in the YAML file or the override '{key}=...'."
    )


def apply_override(raw: dict[str, Any], item: str) -> None:
    if "=" not in item:
        raise ConfigError(f"Override {item!r} is not of the form section.key=value (e.g. optim.lr=0.3).")
    dotted, text = item.split("=", 1)
    keys = dotted.strip().split(".")
    if len(keys) < 2 or not all(keys):
        raise ConfigError(f"Override {item!r} must name a section and a key, e.g. train.epochs=5.")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or type(e).__name__
        raise ConfigError(f"Override {item!r}: the value is not valid YAML ({problem}); quote it or fix the brackets.") from None
    node = raw
    for k in keys[:-1]:
        child = node.get(k)
        if child is None:
            child = node[k] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"Override {item!r}: '{k}' holds a value, not a section.")
        node = child
    node[keys[-1]] = value
