"""The benchmark's output: the machine it ran on, the printed summary and the rows of docs/performance.md.

`write_markdown` keeps one row per run (keyed by its first cell) between the two markers, so rerunning a
measurement replaces its row. tools/benchmark.py measures; this module only formats.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
from pathlib import Path
from typing import Any

MARK_START, MARK_END = "<!-- benchmark rows: start -->", "<!-- benchmark rows: end -->"
PRECISION = {"no": "fp32"}  # Accelerate's name for full precision
COLUMNS = ["run", "machine", "per-image views img/s/core", "batched views img/s/core", "step img/s",
           "bare backbone img/s", "overhead step/bare", "end-to-end img/s", "peak MB", "date"]


def machine() -> dict[str, Any]:
    import torch

    cpu, flags = platform.processor() or platform.machine(), []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = [f for f in ("avx512f", "avx512_bf16", "amx_bf16") if f in line.split()]
                break
    except OSError:
        pass
    from selfsup.hardware import cpu_isa, cpu_native_bf16, usable_cores

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cpu_flags": flags, "cores": os.cpu_count(), "usable_cores": usable_cores(), "gpu": gpu,
            "isa": cpu_isa(), "native_bf16": cpu_native_bf16(), "torch": torch.__version__,
            "python": platform.python_version()}


def _fmt(value: Any, digits: int = 0) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def row_cells(result: dict[str, Any], label: str | None) -> list[str]:
    views, step, bare = result.get("view_pipeline", {}), result.get("step", {}), result.get("bare_backbone", {})
    memory = result["peak_memory_mb"]
    m = result["machine"]
    bf16 = "native bf16" if m.get("native_bf16", "amx_bf16" in m.get("cpu_flags", [])) else "no native bf16"
    threads = step.get("threads", result["settings"]["threads"])
    workers = result.get("end_to_end", {}).get("num_workers")
    where = m["gpu"] if result["device"] == "cuda" else (
        f"{m['cpu']} ({m.get('isa', '?')}, {bf16}), {m.get('usable_cores', m['cores'])} cores, {threads} threads"
        + (f" + {workers} workers" if workers is not None else ""))
    name = label or " ".join([Path(result["config"]).stem, *result["overrides"]])
    return [
        f"{name} ({result['device']}, {PRECISION.get(result['precision'], result['precision'])})", where,
        _fmt(views.get("per_image_augment_images_per_s")), _fmt(views.get("batched_cpu_1thread_images_per_s")),
        _fmt(step.get("images_per_s"), 1), _fmt(bare.get("images_per_s"), 1), _fmt(result.get("method_overhead"), 3),
        _fmt(result.get("end_to_end", {}).get("images_per_s"), 1),
        _fmt(memory.get("cuda_max_allocated", memory["process_max_rss"])),
        datetime.date.today().isoformat(),
    ]


def write_markdown(path: Path, result: dict[str, Any], label: str | None) -> None:
    """Replace (or add) this run's row, keyed by its first cell, in the table between the markers."""
    cells = row_cells(result, label)
    line = "| " + " | ".join(cells) + " |"
    text = path.read_text() if path.exists() else "# Performance\n\n"
    if MARK_START not in text:
        header = "| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS)
        text = text.rstrip("\n") + f"\n\n{MARK_START}\n{header}\n{MARK_END}\n"
    head, rest = text.split(MARK_START, 1)
    table, tail = rest.split(MARK_END, 1)
    lines = [ln for ln in table.strip("\n").splitlines() if ln.strip()]
    key = cells[0]
    for i, ln in enumerate(lines):
        if ln.startswith("| ") and ln[2:].split(" | ", 1)[0] == key:
            lines[i] = line
            break
    else:
        lines.append(line)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(head + MARK_START + "\n" + "\n".join(lines) + "\n" + MARK_END + tail)


def print_summary(result: dict[str, Any]) -> None:
    views = result.get("view_pipeline")
    if views:
        print(f"[bench] view pipeline per worker (1 thread): decode {views['decode_images_per_s']:.0f} img/s, "
              f"per-image views {views['per_image_augment_images_per_s']:.0f} img/s, decode+views "
              f"{views['per_image_images_per_s']:.0f} img/s"
              + (f"; batched views on CPU {views['batched_cpu_1thread_images_per_s']:.0f} img/s "
                 f"({views['batched_speedup_per_core']:.1f}x per core)" if "batched_speedup_per_core" in views else "")
              + (f"; batched on the device {views['batched_device_images_per_s']:.0f} img/s" if "batched_device_images_per_s" in views else ""))
    for name in ("step", "bare_backbone", "end_to_end"):
        if name in result:
            r = result[name]
            print(f"[bench] {name}: {r['images_per_s']:.1f} img/s ({r['step_ms']:.1f} ms/step)")
    if "method_overhead" in result:
        print(f"[bench] method overhead (step / bare backbone): {result['method_overhead']:.3f}")
    for row in result.get("sweep", []):
        parts = [f"{k} {row[k]['step_ms']:.1f} ms" for k in ("step", "bare_backbone") if k in row]
        print(f"[bench] sweep {row['override']}: " + ", ".join(parts))
    print(f"[bench] peak memory (MB): {json.dumps({k: round(v) for k, v in result['peak_memory_mb'].items()})}")
