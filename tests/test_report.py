"""The report of a finished run (report.md, self-contained report.html, plots), its regeneration from the run
directory alone, the comparison of runs, and how the HTML looks in a real browser (headless chromium)."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from selfsup.cli import pretrain
from selfsup.report import write_report
from tests.conftest import ROOT, tiny_config_dict, write_config

SECTIONS = ("# Pretraining report: tiny", "## Results", "## Time and throughput", "## Environment", "## Plots",
            "## Resolved config (config.yaml)")
PLOT_SIZES = {"loss_lr.png": (1000, 340), "knn.png": (600, 340)}  # figsize x dpi 100


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A tiny SimCLR run, 3 steps, evaluated at the end beside random init and raw pixels (shared by the tests)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    tmp_path = tmp_path_factory.mktemp("report")
    cfg = tiny_config_dict(tmp_path, train={"max_steps": 3},
                           eval={"at_end": True, "random_init_baseline": True, "pixel_baseline": True,
                                 "max_train_samples": 64, "max_test_samples": 32, "knn_k": 5})
    pretrain.main(["--config", str(write_config(tmp_path, cfg))])
    return tmp_path / "runs" / "tiny"


def decode_png(data: bytes) -> np.ndarray:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def embedded_pngs(page: str) -> list[np.ndarray]:
    return [decode_png(base64.b64decode(b64)) for b64 in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)]


def test_pretraining_ends_with_a_report_with_every_section(finished_run):
    summary = json.loads((finished_run / "summary.json").read_text())
    for key in ("knn_top1", "linear_probe_top1", "random_init_knn_top1", "random_init_linear_probe_top1",
                "pixels_knn_top1", "pixels_linear_probe_top1"):
        assert 0.0 <= summary[key] <= 100.0, key
    info = json.loads((finished_run / "run_info.json").read_text())
    assert info["wall_time_s"] > info["fit_time_s"] > 0
    for key in ("python", "torch", "timm", "accelerate", "device", "cpu", "cpu_isa", "cpu_native_bf16", "processes",
                "threads", "precision"):
        assert key in info["environment"], key

    md = (finished_run / "report.md").read_text()
    for section in SECTIONS:
        assert section in md, section
    assert "| kNN top-1 (k=5" in md and "| linear probe top-1" in md
    assert f"{summary['knn_top1']:.1f} %" in md and f"{summary['pixels_linear_probe_top1']:.1f} %" in md
    assert re.search(r"the encoder is (above|BELOW|equal to) same backbone at random init", md)
    assert "![Loss and learning rate per step](plots/loss_lr.png)" in md and "plots/knn.png" in md
    assert "dataset: synthetic" in md  # the resolved config
    assert "reconstruction" not in md.lower()  # SimCLR reconstructs nothing

    page = (finished_run / "report.html").read_text()
    for section in ("Results", "Time and throughput", "Environment", "Plots", "Resolved config"):
        assert f"<h2>{section}" in page
    assert not re.search(r'(src|href)="(?!data:)', page)  # self-contained: nothing fetched
    images = embedded_pngs(page)
    assert [im.shape[:2][::-1] for im in images] == list(PLOT_SIZES.values())
    for name, size in PLOT_SIZES.items():
        pixels = decode_png((finished_run / "plots" / name).read_bytes())
        assert pixels.shape[:2][::-1] == size and pixels.std() > 1.0, name


def test_report_regenerates_from_the_run_directory_alone(finished_run, tmp_path):
    copy = tmp_path / "elsewhere" / "tiny"
    shutil.copytree(finished_run, copy, ignore=shutil.ignore_patterns("checkpoints", "encoder"))
    for name in ("report.md", "report.html", "plots"):
        shutil.rmtree(copy / name) if (copy / name).is_dir() else (copy / name).unlink()
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "report.py"), str(copy)], capture_output=True,
                         text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert (copy / "report.md").read_text() == (finished_run / "report.md").read_text()
    assert (copy / "report.html").read_text() == (finished_run / "report.html").read_text()


def test_report_embeds_the_reconstruction_grid_of_masked_image_methods(finished_run, tmp_path):
    import torch

    from selfsup.plots import save_reconstruction_grid

    copy = tmp_path / "mae_like"
    shutil.copytree(finished_run, copy, ignore=shutil.ignore_patterns("checkpoints", "encoder"))
    grid = {name: torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(i))
            for i, name in enumerate(("original", "masked", "reconstruction"))}
    save_reconstruction_grid(grid, copy / "reconstruction.png", mean=[0, 0, 0], std=[1, 1, 1])
    md, page = write_report(copy)
    assert "![Reconstructions: original / masked / reconstruction](reconstruction.png)" in md.read_text()
    images = embedded_pngs(page.read_text())
    assert len(images) == 3 and images[2].shape == decode_png((copy / "reconstruction.png").read_bytes()).shape


def test_comparison_of_two_runs(finished_run, tmp_path):
    other = tmp_path / "runs" / "longer"
    shutil.copytree(finished_run, other, ignore=shutil.ignore_patterns("checkpoints", "encoder"))
    summary = json.loads((other / "summary.json").read_text())
    (other / "summary.json").write_text(json.dumps({**summary, "knn_top1": 12.5}))
    records = [json.loads(line) for line in (other / "metrics.jsonl").read_text().splitlines()]
    (other / "metrics.jsonl").write_text("".join(
        json.dumps({**r, "loss": r["loss"] - 1} if "loss" in r else {**r, "knn_top1": 12.5}) + "\n" for r in records))

    out = subprocess.run([sys.executable, str(ROOT / "tools" / "report.py"), str(finished_run), str(other),
                          "--output", str(tmp_path / "compare")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    md = (tmp_path / "compare" / "report.md").read_text()
    assert "# Comparison of 2 runs" in md
    rows = [line for line in md.splitlines() if line.startswith(("| tiny | simclr", "| longer | simclr"))]
    assert len(rows) == 2 and "12.5 %" in rows[1] and f"{summary['knn_top1']:.1f} %" in rows[0]
    best = max((summary["knn_top1"], "tiny"), (12.5, "longer"))
    assert f"Highest kNN top-1: {best[1]} ({best[0]:.1f} %)" in md
    images = embedded_pngs((tmp_path / "compare" / "report.html").read_text())
    assert [im.shape[:2][::-1] for im in images] == list(PLOT_SIZES.values())
    assert all(im.std() > 1.0 for im in images)


def test_report_of_a_directory_that_is_not_a_run_says_so(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "report.py"), str(tmp_path)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "no config.yaml" in out.stderr and "Traceback" not in out.stderr


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (Debian: apt-get install -y chromium)")
def test_report_html_renders_with_its_plots_in_a_browser(finished_run, tmp_path):
    shot = tmp_path / "report.png"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
           f"--screenshot={shot}", "--window-size=1200,2400", (finished_run / "report.html").as_uri()]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert shot.is_file(), out.stderr[-2000:]
    pixels = decode_png(shot.read_bytes()).astype(int)
    assert pixels.shape[:2] == (2400, 1200)
    assert pixels.std() > 10  # not a blank page
    # matplotlib's first line colour (#1f77b4) appears only in the plots: the embedded PNGs were drawn
    plot_blue = (np.abs(pixels - np.array([0x1F, 0x77, 0xB4])).sum(axis=2) < 30).sum()
    assert plot_blue > 200, plot_blue
