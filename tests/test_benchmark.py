"""tools/benchmark.py runs end to end on a tiny config and writes every figure (no timing assertions)."""

import importlib.util
import json
import math
from pathlib import Path

from tests.conftest import tiny_config_dict, write_config

ROOT = Path(__file__).resolve().parents[1]


def _tool():
    spec = importlib.util.spec_from_file_location("benchmark_tool", ROOT / "tools" / "benchmark.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _positive(x) -> bool:
    return isinstance(x, float) and math.isfinite(x) and x > 0


def test_benchmark_writes_json_and_markdown(tmp_path):
    tool = _tool()
    cfg = tiny_config_dict(tmp_path, data={"batch_size": 16, "num_samples": 64, "num_workers": 1})
    config = write_config(tmp_path, cfg)
    out, table = tmp_path / "bench.json", tmp_path / "perf.md"
    argv = ["--config", str(config), "--warmup", "1", "--steps", "1", "--repeats", "2",
            "--json", str(out), "--markdown", str(table), "--sweep", "data.augment_on=workers,device"]
    tool.main(argv)
    result = json.loads(out.read_text())

    assert result["device"] in ("cpu", "cuda") and result["method"] == "simclr" and result["batch_size"] == 16
    assert result["machine"]["cores"] >= 1 and result["machine"]["cpu"]
    views = result["view_pipeline"]
    assert views["num_views"] == 2 and views["images"] == 16
    for key in ("decode_images_per_s", "per_image_augment_images_per_s", "per_image_images_per_s",
                "batched_cpu_1thread_images_per_s", "batched_speedup_per_core"):
        assert _positive(views[key]), key
    for phase in ("step", "bare_backbone", "end_to_end"):
        assert _positive(result[phase]["images_per_s"]) and _positive(result[phase]["step_ms"]), phase
        assert len(result[phase]["windows_images_per_s"]) == 2, phase  # one figure per repeat
    assert result["bare_backbone"]["views_per_step"] == 32  # the same images: 2 views of 16
    assert result["end_to_end"]["num_workers"] == 1 and result["step"]["num_workers"] == 0
    assert _positive(result["method_overhead"]) and _positive(result["peak_memory_mb"]["process_max_rss"])
    assert [row["override"] for row in result["sweep"]] == ["data.augment_on=workers", "data.augment_on=device"]
    assert all(_positive(row["method_overhead"]) for row in result["sweep"])

    # the markdown row is keyed by the run; running again replaces it instead of adding one
    rows = [line for line in table.read_text().splitlines() if line.startswith("| tiny")]
    assert len(rows) == 1 + 2 and all(f"({result['device']}, " in row for row in rows)  # the run + one per swept value
    assert [row.split(" (")[0] for row in rows[1:]] == [f"| tiny {o}" for o in ("data.augment_on=workers", "data.augment_on=device")]
    tool.write_markdown(table, result, None)
    tool.write_markdown(table, result, "other run")
    rows = [line for line in table.read_text().splitlines() if line.startswith("| ")]
    assert len(rows) == 1 + 2 + 2  # the header, two runs and the two swept rows
