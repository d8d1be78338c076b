"""A run's report (report.md and a self-contained report.html) and the comparison of several runs, made from
the run directory alone: config.yaml, summary.json, run_info.json, metrics.jsonl, reconstruction.png.

Pretraining writes the report at its end; `python tools/report.py RUN` writes it again, and
`python tools/report.py RUN_A RUN_B ...` compares runs. The HTML embeds its PNG plots as base64 data URIs,
so it opens anywhere without other files or a network. Plots are matplotlib; the Markdown / HTML are written
here by hand (a few tables and headings do not need a template engine).
"""

from __future__ import annotations

import base64
import html
import json
import os
import platform
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

__all__ = ["environment", "write_run_info", "load_run", "write_report", "write_comparison"]

RUN_INFO = "run_info.json"
# summary.json key prefix of each end-of-run evaluation (eval.final) and how the report names it
PROTOCOLS = {"knn": "kNN top-1", "linear_probe": "linear probe top-1"}
BASELINES = (("random_init_", "same backbone at random init"), ("pixels_", "raw pixels"))


# --------------------------------------------------------------------------------------------
# what a run records about itself


def cpu_model() -> str:
    """The CPU's marketing name (Linux /proc/cpuinfo), else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(accelerator: Any = None, **extra: Any) -> dict[str, Any]:
    """Versions and machine facts a figure depends on (selfsup/hardware.py's view of the CPU), plus the
    device, processes and precision of `accelerator` when given."""
    import accelerate
    import timm
    import torch

    from selfsup.hardware import cpu_isa, cpu_native_bf16, usable_cores

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "accelerate": accelerate.__version__,
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_isa": cpu_isa(),
        "cpu_native_bf16": cpu_native_bf16(),
        "usable_cores": usable_cores(),
        "threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
    }
    if accelerator is not None:
        env.update(device=str(accelerator.device), processes=accelerator.num_processes,
                   precision=accelerator.mixed_precision)
        if accelerator.device.type == "cuda":
            env["gpu"] = torch.cuda.get_device_name(accelerator.device)
    env.update(extra)
    return env


def write_run_info(run_dir: str | Path, info: dict[str, Any]) -> Path:
    """run_info.json: wall time and environment of the run, so the report can be made again later."""
    path = Path(run_dir) / RUN_INFO
    path.write_text(json.dumps(info, indent=2))
    return path


def load_run(run_dir: str | Path) -> dict[str, Any]:
    """Everything the report reads from a run directory; FileNotFoundError when it is not a pretraining run."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"{run_dir} has no config.yaml: pass a pretraining run directory (runs/<name>).")

    def read_json(name: str) -> dict[str, Any]:
        path = run_dir / name
        return json.loads(path.read_text()) if path.is_file() else {}

    metrics_file = run_dir / "metrics.jsonl"
    records = ([json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
               if metrics_file.is_file() else [])
    config_text = (run_dir / "config.yaml").read_text()
    return {"dir": run_dir, "name": run_dir.name, "config_text": config_text,
            "config": yaml.safe_load(config_text) or {}, "summary": read_json("summary.json"),
            "info": read_json(RUN_INFO), "records": records}


# --------------------------------------------------------------------------------------------
# figures


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _curve(records: list[dict], key: str) -> tuple[list[float], list[float]]:
    points = [(r["step"], r[key]) for r in records if key in r and "step" in r]
    return [p[0] for p in points], [p[1] for p in points]


def plot_loss_lr(runs: Sequence[dict], path: Path) -> Path | None:
    """Loss and learning rate per step, one line per run; None when no run logged a step."""
    if not any(_curve(run["records"], "loss")[0] for run in runs):
        return None
    plt = _pyplot()
    fig, (loss_ax, lr_ax) = plt.subplots(1, 2, figsize=(10, 3.4))
    for run in runs:
        for ax, key in ((loss_ax, "loss"), (lr_ax, "lr")):
            steps, values = _curve(run["records"], key)
            ax.plot(steps, values, marker="o" if len(steps) < 20 else None, markersize=3, label=run["label"])
    loss_ax.set_title("training loss")
    lr_ax.set_title("learning rate")
    for ax in (loss_ax, lr_ax):
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    if len(runs) > 1:
        loss_ax.legend(fontsize=8)
    return _save(fig, plt, path)


def plot_knn(runs: Sequence[dict], path: Path) -> Path | None:
    """kNN top-1 at every evaluation (one point when only at the end), one line per run; for a single run
    its baselines as dashed lines. None when no run was evaluated."""
    if not any(_curve(run["records"], "knn_top1")[0] for run in runs):
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.4))
    for run in runs:
        steps, values = _curve(run["records"], "knn_top1")
        ax.plot(steps, values, marker="o", label=f"{run['label']} encoder" if len(runs) > 1 else "encoder")
    if len(runs) == 1:
        summary = runs[0]["summary"]
        for (prefix, label), style in zip(BASELINES, ("--", ":")):
            if f"{prefix}knn_top1" in summary:
                ax.axhline(summary[f"{prefix}knn_top1"], linestyle=style, color="gray" if style == "--" else "black",
                           label=f"{label} {summary[f'{prefix}knn_top1']:.1f} %")
    last_step = max((r["step"] for run in runs for r in run["records"] if "step" in r), default=0)
    ax.set_xlim(0, max(1, last_step) * 1.05)  # the whole run, so a single end-of-run point sits at its end
    ax.set_title("kNN top-1 per evaluation")
    ax.set_xlabel("step")
    ax.set_ylabel("top-1 (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return _save(fig, plt, path)


def _save(fig, plt, path: Path) -> Path:
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------
# the documents: a list of blocks rendered twice, as Markdown and as HTML


def _pct(value: Any) -> str:
    return f"{value:.1f} %" if isinstance(value, (int, float)) else "—"


def _duration(seconds: Any) -> str:
    if not isinstance(seconds, (int, float)):
        return "not recorded"
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes} min {secs} s ({seconds:.0f} s)" if minutes else f"{seconds:.1f} s"


def verdict(mine: float, summary: dict, protocol: str) -> str:
    """Which is higher, the encoder or each baseline, as `compare_line` says it."""
    parts = []
    for prefix, label in BASELINES:
        other = summary.get(f"{prefix}{protocol}_top1")
        if isinstance(other, (int, float)):
            word = "above" if mine > other else "BELOW" if mine < other else "equal to"
            parts.append(f"{word} {label} ({mine - other:+.1f} points)")
    return "the encoder is " + "; ".join(parts) if parts else "no baselines recorded"


def _protocols(run: dict) -> list[str]:
    listed = (run["config"].get("eval") or {}).get("final", list(PROTOCOLS))
    return [p for p in PROTOCOLS if p in listed and f"{p}_top1" in run["summary"]]


def _protocol_caption(run: dict, protocol: str) -> str:
    ev = run["config"].get("eval") or {}
    if protocol == "knn":
        return f"kNN top-1 (k={ev.get('knn_k')}, T={ev.get('knn_temperature')}, cosine)"
    return "linear probe top-1 (logistic regression, L-BFGS, on the same cached features)"


def _median_throughput(records: list[dict]) -> float | None:
    values = [r["images_per_sec"] for r in records if "images_per_sec" in r]
    return statistics.median(values) if values else None


def _run_blocks(run: dict, plots: dict[str, Path | None]) -> list[tuple]:
    cfg, summary, info = run["config"], run["summary"], run["info"]
    data, backbone, method = cfg.get("data") or {}, cfg.get("backbone") or {}, cfg.get("method") or {}
    ev = cfg.get("eval") or {}
    blocks: list[tuple] = [("h1", f"Pretraining report: {run['name']}")]
    last_loss = summary.get("last_loss")
    blocks.append(("p", f"{method.get('name')} on {data.get('dataset')} ({data.get('image_size')} px), backbone "
                        f"{backbone.get('name')}; {summary.get('steps', '?')} steps"
                        + (f", last loss {last_loss:.4f}." if isinstance(last_loss, (int, float)) else ".")))

    blocks.append(("h2", "Results"))
    protocols = _protocols(run)
    if protocols:
        sizes = f"{ev.get('max_train_samples')} training / {ev.get('max_test_samples')} test images at most"
        blocks.append(("p", f"The exported encoder, scored at the end of the run ({sizes}), beside the same "
                            "backbone at random initialisation and raw pixels on the same protocol."))
        rows = []
        for protocol in protocols:
            mine = summary[f"{protocol}_top1"]
            rows.append([_protocol_caption(run, protocol), _pct(mine),
                         *(_pct(summary.get(f"{prefix}{protocol}_top1")) for prefix, _ in BASELINES),
                         verdict(mine, summary, protocol)])
        blocks.append(("table", ["protocol", "encoder", "random init", "raw pixels", "which is higher"], rows))
    else:
        blocks.append(("p", "No end-of-run evaluation was recorded (eval.at_end off, eval.final empty, or no "
                            "labelled set for the monitor)."))

    blocks.append(("h2", "Time and throughput"))
    global_batch = (data.get("batch_size") or 0) * ((info.get("environment") or {}).get("processes") or 1) \
        * ((cfg.get("train") or {}).get("accumulate_steps") or 1)
    throughput = _median_throughput(run["records"])
    blocks.append(("table", ["", "value"], [
        ["wall time (setup, training, evaluation, export)", _duration(info.get("wall_time_s"))],
        ["training (fit, with its evaluations)", _duration(info.get("fit_time_s"))],
        ["end-of-run evaluation (eval.final and baselines)", _duration(info.get("final_eval_time_s"))],
        ["images / s (median of the logged windows)", f"{throughput:.0f}" if throughput else "not logged"],
        ["steps / global batch", f"{summary.get('steps', '?')} / {global_batch or '?'}"],
        ["started", info.get("started", "not recorded")],
    ]))

    blocks.append(("h2", "Environment"))
    env = info.get("environment") or {}
    if env:
        labels = {"cpu": "CPU", "cpu_isa": "CPU ISA (ATen)", "cpu_native_bf16": "CPU native bf16",
                  "usable_cores": "usable cores", "threads": "intra-op threads", "omp_wait_policy": "OMP_WAIT_POLICY",
                  "gpu": "GPU", "workers": "DataLoader workers"}
        blocks.append(("table", ["", "value"], [[labels.get(k, k), str(v)] for k, v in env.items()]))
    else:
        blocks.append(("p", f"Not recorded ({RUN_INFO} is missing: a run made before reports existed)."))

    blocks.append(("h2", "Plots"))
    for key, caption in (("loss_lr", "Loss and learning rate per step"), ("knn", "kNN top-1 per evaluation"),
                         ("reconstruction", "Reconstructions: original / masked / reconstruction")):
        if plots.get(key) is not None:
            blocks.append(("img", plots[key], caption))
    if plots.get("knn") is None:
        blocks.append(("p", "No kNN evaluation was logged."))

    blocks.append(("h2", "Resolved config (config.yaml)"))
    blocks.append(("pre", run["config_text"]))
    return blocks


def _render_md(blocks: list[tuple], base: Path) -> str:
    out = []
    for kind, *rest in blocks:
        if kind == "h1":
            out.append(f"# {rest[0]}\n")
        elif kind == "h2":
            out.append(f"## {rest[0]}\n")
        elif kind == "p":
            out.append(f"{rest[0]}\n")
        elif kind == "table":
            header, rows = rest

            def cell(value: Any) -> str:
                return str(value).replace("|", "\\|")
            out.append("| " + " | ".join(cell(h) for h in header) + " |")
            out.append("|" + "---|" * len(header))
            out.extend("| " + " | ".join(cell(v) for v in row) + " |" for row in rows)
            out.append("")
        elif kind == "img":
            path, caption = rest
            out.append(f"![{caption}]({os.path.relpath(path, base)})\n")
        elif kind == "pre":
            out.append(f"```yaml\n{rest[0].rstrip()}\n```\n")
    return "\n".join(out)


STYLE = """body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:0.5em 0 1.2em}th,td{border:1px solid #ccc;padding:4px 10px;text-align:left}
th{background:#f2f2f2}figure{margin:1em 0}figcaption{color:#555;font-size:0.9em}img{max-width:100%}
pre{background:#f7f7f7;padding:0.8em;overflow-x:auto;font-size:0.85em}"""


def _render_html(blocks: list[tuple], title: str) -> str:
    esc = html.escape
    out = ["<!DOCTYPE html>", "<html lang=\"en\"><head><meta charset=\"utf-8\">", f"<title>{esc(title)}</title>",
           f"<style>{STYLE}</style></head><body>"]
    for kind, *rest in blocks:
        if kind in ("h1", "h2", "p"):
            out.append(f"<{kind}>{esc(rest[0])}</{kind}>")
        elif kind == "table":
            header, rows = rest
            out.append("<table><tr>" + "".join(f"<th>{esc(str(h))}</th>" for h in header) + "</tr>")
            out.extend("<tr>" + "".join(f"<td>{esc(str(v))}</td>" for v in row) + "</tr>" for row in rows)
            out.append("</table>")
        elif kind == "img":
            path, caption = rest
            data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
            out.append(f"<figure><img src=\"data:image/png;base64,{data}\" alt=\"{esc(caption)}\">"
                       f"<figcaption>{esc(caption)}</figcaption></figure>")
        elif kind == "pre":
            out.append(f"<pre>{esc(rest[0])}</pre>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def _write(blocks: list[tuple], out_dir: Path, title: str) -> tuple[Path, Path]:
    md, page = out_dir / "report.md", out_dir / "report.html"
    md.write_text(_render_md(blocks, out_dir))
    page.write_text(_render_html(blocks, title))
    return md, page


# --------------------------------------------------------------------------------------------
# entry points


def write_report(run_dir: str | Path) -> tuple[Path, Path]:
    """RUN/report.md and RUN/report.html (plots in RUN/plots/), from the run directory alone."""
    run = load_run(run_dir)
    run["label"] = run["name"]
    plots_dir = run["dir"] / "plots"
    plots = {"loss_lr": plot_loss_lr([run], plots_dir / "loss_lr.png"), "knn": plot_knn([run], plots_dir / "knn.png")}
    if (run["dir"] / "reconstruction.png").is_file():
        plots["reconstruction"] = run["dir"] / "reconstruction.png"
    return _write(_run_blocks(run, plots), run["dir"], f"selfsup report: {run['name']}")


def _labels(dirs: Sequence[Path]) -> list[str]:
    """Run names, with the parent folder added where two runs share a name."""
    names = [d.name for d in dirs]
    return [f"{d.parent.name}/{d.name}" if names.count(d.name) > 1 else d.name for d in dirs]


def write_comparison(run_dirs: Sequence[str | Path], out_dir: str | Path = "runs/compare") -> tuple[Path, Path]:
    """One report comparing runs: their final figures in a table and overlaid loss / kNN curves."""
    runs = [load_run(d) for d in run_dirs]
    for run, label in zip(runs, _labels([r["dir"].resolve() for r in runs])):
        run["label"] = label
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = {"loss_lr": plot_loss_lr(runs, out_dir / "plots" / "loss_lr.png"),
             "knn": plot_knn(runs, out_dir / "plots" / "knn.png")}

    blocks: list[tuple] = [("h1", f"Comparison of {len(runs)} runs")]
    header = ["run", "method", "backbone", "dataset", "steps", "wall time", "images / s"]
    for protocol, name in PROTOCOLS.items():
        header += [name, f"{name}, random init", f"{name}, raw pixels"]
    rows = []
    for run in runs:
        cfg, summary, info = run["config"], run["summary"], run["info"]
        throughput = _median_throughput(run["records"])
        row = [run["label"], (cfg.get("method") or {}).get("name"), (cfg.get("backbone") or {}).get("name"),
               (cfg.get("data") or {}).get("dataset"), summary.get("steps", "—"),
               _duration(info.get("wall_time_s")) if info else "not recorded",
               f"{throughput:.0f}" if throughput else "—"]
        for protocol in PROTOCOLS:
            row += [_pct(summary.get(f"{prefix}{protocol}_top1")) for prefix in ("", "random_init_", "pixels_")]
        rows.append(row)
    blocks.append(("p", "Final figures of each run (— where a run did not record one), each protocol beside the "
                        "same backbone at random initialisation and raw pixels."))
    blocks.append(("table", header, rows))
    best = [(run["summary"]["knn_top1"], run["label"]) for run in runs if "knn_top1" in run["summary"]]
    if len(best) > 1:
        top = max(best)
        blocks.append(("p", f"Highest kNN top-1: {top[1]} ({top[0]:.1f} %)."))
    blocks.append(("h2", "Curves"))
    if plots["loss_lr"] is not None:
        blocks.append(("img", plots["loss_lr"], "Loss and learning rate per step, overlaid"))
    if plots["knn"] is not None:
        blocks.append(("img", plots["knn"], "kNN top-1 per evaluation, overlaid"))
    blocks.append(("h2", "Runs"))
    blocks.append(("table", ["run", "directory"], [[run["label"], str(run["dir"])] for run in runs]))
    return _write(blocks, out_dir, f"selfsup comparison of {len(runs)} runs")
