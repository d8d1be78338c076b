"""docs/recipes.md: every "this project" cell equals what the code gives a config that leaves the key unset,
so a default cannot change without its row (the table's format is described at the top of the page)."""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

import tools.finetune
import tools.linear_probe
from selfsup.backbones import create_backbone
from selfsup.config import from_dict, load_config
from selfsup.masking import default_mask_patch_size, vit_patch_grid
from selfsup.methods.mae import decoder_defaults
from selfsup.methods.moco import _resolve as resolve_moco
from selfsup.probe_protocols import PROTOCOLS
from selfsup.transforms import build_views

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "docs" / "recipes.md"
HEADER = ["key", "method", "backbone", "this project", "paper", "official code", "source", "note"]
# method column -> (method section, view preset, tool defaults)
METHODS: dict[str, tuple[dict[str, Any], str | None, dict | None]] = {
    "simclr": ({"name": "simclr"}, "simclr", None),
    "moco v2": ({"name": "moco", "variant": "v2"}, "moco_v2", None),
    "moco v3": ({"name": "moco", "variant": "v3"}, "moco_v3", None),
    "byol": ({"name": "byol"}, "byol", None),
    "barlow_twins": ({"name": "barlow_twins"}, "byol", None),
    "vicreg": ({"name": "vicreg"}, "byol", None),
    "mae": ({"name": "mae"}, "mae", None),
    "simmim": ({"name": "simmim"}, "simmim", None),
    "dino": ({"name": "dino"}, "dino", None),
    "ibot": ({"name": "ibot"}, "ibot", None),
    "linear_probe": ({}, "finetune", tools.linear_probe.DEFAULTS),
    **{f"linear_probe {name}": ({}, "finetune", protocol.recipe()) for name, protocol in PROTOCOLS.items()},
    "finetune": ({}, "finetune", tools.finetune.DEFAULTS),
}


@dataclasses.dataclass
class Row:
    line: int
    key: str  # dotted key, or a behaviour in plain text
    is_key: bool
    method: str
    backbone: str
    image_size: int
    project: str


def parse_rows(text: str) -> list[Row]:
    """Rows of every table whose header is HEADER; a table with another header starting with `key` is an error."""
    rows, in_table = [], False
    for number, line in enumerate(text.splitlines(), 1):
        if not line.startswith("|"):
            in_table = False
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not in_table:
            if cells[0] == "key":
                assert cells == HEADER, f"docs/recipes.md line {number}: the header must be {HEADER}"
                in_table = True
            continue
        if set("".join(cells)) <= set("-: "):
            continue  # the |---| line
        assert len(cells) == len(HEADER), f"docs/recipes.md line {number}: {len(cells)} cells, not {len(HEADER)}"
        key, method, backbone, project = cells[:4]
        match = re.fullmatch(r"([\w.\-]+)(?:,\s*(\d+) px)?", backbone)
        assert match, f"line {number}: backbone {backbone!r} is not 'name' or 'name, N px'"
        assert method in METHODS, f"line {number}: method {method!r} is not one of {list(METHODS)}"
        is_key = key.startswith("`") and key.endswith("`")
        rows.append(Row(number, key.strip("`"), is_key, method, match.group(1), int(match.group(2) or 224), project))
    return rows


ROWS = parse_rows(RECIPES.read_text())


def parse_value(cell: str) -> Any:
    value = yaml.safe_load(cell.strip("`"))
    if isinstance(value, str):
        try:
            return float(value)  # YAML 1.1 reads 1e-6 as a string
        except ValueError:
            pass
    return value


def plain(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def same(expected: Any, actual: Any) -> bool:
    if isinstance(expected, bool) or isinstance(actual, bool) or expected is None or actual is None:
        return expected == actual
    if isinstance(expected, (int, float)) and isinstance(actual, (int, float)):
        return math.isclose(expected, actual, rel_tol=1e-9, abs_tol=0.0)
    if isinstance(expected, list) and isinstance(actual, list):
        return len(expected) == len(actual) and all(same(e, a) for e, a in zip(expected, actual))
    return expected == actual


def meta_backbone(name: str) -> torch.nn.Module:
    with torch.device("meta"):
        return create_backbone(name)


def project_default(row: Row) -> Any:
    """What the code gives for `row.key` when the config leaves it unset, for this method and backbone."""
    method, preset, tool_defaults = METHODS[row.method]
    section, _, name = row.key.partition(".")
    if section == "data" and name.startswith("views."):
        option = name.removeprefix("views.")
        params = build_views(preset, image_size=row.image_size, mean=[0.5] * 3, std=[0.5] * 3).params
        values = [plain(p[option]) for p in params]
        return values[0] if all(v == values[0] for v in values) else values
    raw: dict[str, Any] = {"backbone": {"name": row.backbone}} if row.backbone != "any" else {}
    if method:
        raw["method"] = method
    cfg = load_config(None, defaults=tool_defaults) if tool_defaults is not None else from_dict(raw)
    if section != "method":
        return plain(getattr(getattr(cfg, section), name))
    method_cfg = cfg.method
    backbone = meta_backbone(row.backbone)
    if method_cfg.name == "moco":
        method_cfg = resolve_moco(method_cfg, backbone)  # the variant's and backbone's values
    value = getattr(method_cfg, name)
    if value is None and method_cfg.name == "mae" and name.startswith("decoder_"):
        dim, depth, heads = decoder_defaults(method_cfg, backbone.embed_dim, len(backbone.blocks))
        value = {"decoder_embed_dim": dim, "decoder_depth": depth, "decoder_num_heads": heads}[name]
    if value is None and method_cfg.name == "simmim" and name == "mask_patch_size":
        grid_h, grid_w, patch = vit_patch_grid(backbone)
        value = default_mask_patch_size((grid_h * patch, grid_w * patch), patch)
    return plain(value)


def test_the_tables_cover_every_method():
    assert {row.method for row in ROWS} == set(METHODS)
    assert sum(row.is_key for row in ROWS) >= 80


@pytest.mark.parametrize("row", [r for r in ROWS if r.is_key], ids=lambda r: f"L{r.line}-{r.method}-{r.key}")
def test_project_default_matches_the_code(row: Row):
    expected, actual = parse_value(row.project), project_default(row)
    assert same(plain(expected), actual), (
        f"docs/recipes.md line {row.line}: {row.key} for {row.method} / {row.backbone} is {actual!r} in the code "
        f"but {row.project!r} in the table; update the row (and its note) with the default."
    )


@pytest.mark.parametrize("row", [r for r in ROWS if not r.is_key], ids=lambda r: f"L{r.line}-{r.method}")
def test_behaviour_rows_name_an_existing_test(row: Row):
    match = re.fullmatch(r"(tests/test_\w+\.py)::(test_\w+)", row.project)
    assert match, f"docs/recipes.md line {row.line}: a behaviour row names its test as tests/test_x.py::test_name"
    source = (ROOT / match.group(1)).read_text()
    assert re.search(rf"^def {match.group(2)}\(", source, re.MULTILINE), f"line {row.line}: {row.project} not found"


def test_a_changed_default_is_caught():
    """The check itself: a row whose value differs from the code fails the comparison."""
    row = next(r for r in ROWS if r.is_key and r.method == "moco v2" and r.key == "method.momentum")
    assert same(parse_value(row.project), project_default(row))
    assert not same(parse_value("0.99"), project_default(row))
