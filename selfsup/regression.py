"""Accuracy floor that CI enforces (`python tools/regression.py`): a fixed, seeded, short pretraining per
method family on Fashion-MNIST, scored by kNN, checked against the floors stored in tests/regression_floor.json.

A family fails, one line per failure, when its encoder's kNN top-1
  - is below the stored floor,
  - is not above the same backbone at random init by the stored margin (a "learned nothing" run), or
  - is below raw pixels by more than the stored margin,
the two baselines being scored in the same run, on the same protocol. Each family runs as its own
`pretrain.py` process (a clean Accelerate state, its own wall and CPU time). `--update-floor` rewrites the
JSON from fresh runs on several seeds; raising a floor is a deliberate commit, CI never does it.
Written here because neither pytest nor the training code checks accuracy against a stored figure.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import math
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
FLOOR_FILE = ROOT / "tests" / "regression_floor.json"
# family -> its config; the floor JSON records the config and its hash, and a changed config needs a new floor
FAMILIES: dict[str, str] = {
    "contrastive": "configs/regression/simclr.yaml",
    "masked": "configs/regression/mae.yaml",
}
# what every family entry of the floor file holds (tests check it)
REQUIRED_FIELDS = ("config", "config_sha256", "floor", "random_init_margin", "pixels_margin", "measured",
                   "random_init_knn_top1", "pixels_knn_top1", "runs", "how_chosen", "date", "commit", "machine")
MACHINE_FIELDS = ("cpu_model", "isa", "native_bf16", "threads", "precision", "usable_cores", "torch")
# setting the floor: below the lowest measured run by max(MIN_NOISE, NOISE_FACTOR x spread of the runs)
MIN_NOISE, NOISE_FACTOR, RANDOM_INIT_MARGIN = 3.0, 2.0, 3.0
# the runs train on the CPU in fp32 at the AVX2 class, as .ci/run and the measured floors do, even on a machine
# with bf16 units or a GPU (whose figures would differ); set any of these in the environment to override
CPU_CLASS = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "CUDA_VISIBLE_DEVICES": ""}


# --------------------------------------------------------------------------------------------
# the check: pure functions of figures, so tests can hand it a broken encoder's numbers


def check_family(family: str, result: dict[str, Any], entry: dict[str, Any]) -> list[str]:
    """Failure lines (empty: passed) for one family's fresh result against its stored floor entry.

    `result` holds knn_top1 and, measured in the same run, random_init_knn_top1 and pixels_knn_top1
    (the stored ones stand in when a run lacks them)."""
    if "knn_top1" not in result:
        return [f"{family}: no kNN top-1 in the run's summary (did eval.at_end get switched off?)"]
    mine = float(result["knn_top1"])
    random_init = float(result.get("random_init_knn_top1", entry["random_init_knn_top1"]))
    pixels = float(result.get("pixels_knn_top1", entry["pixels_knn_top1"]))
    floor, ri_margin, px_margin = float(entry["floor"]), float(entry["random_init_margin"]), float(entry["pixels_margin"])
    failures = []
    if mine < floor:
        failures.append(f"{family}: kNN top-1 {mine:.1f} % is below the floor {floor:.1f} % "
                        f"(measured {_fmt_runs(entry)} on {entry['machine'].get('cpu_model', '?')})")
    if mine <= random_init + ri_margin:
        failures.append(f"{family}: kNN top-1 {mine:.1f} % is not above the same backbone at random init "
                        f"({random_init:.1f} %) by more than {ri_margin:.1f} points: the encoder learned nothing")
    if mine < pixels - px_margin:
        failures.append(f"{family}: kNN top-1 {mine:.1f} % is {pixels - mine:.1f} points below raw pixels "
                        f"({pixels:.1f} %), more than the allowed {px_margin:.1f}")
    return failures


def check_config_unchanged(family: str, entry: dict[str, Any], root: Path = ROOT) -> list[str]:
    """The floor holds only for the config it was measured with."""
    path = root / entry["config"]
    if not path.is_file():
        return [f"{family}: {entry['config']} is missing; the floor was measured with it"]
    if file_sha256(path) != entry["config_sha256"]:
        return [(f"{family}: {entry['config']} changed since its floor was measured; measure again with "
                 f"`python tools/regression.py --update-floor --family {family}` and commit the new floor")]
    return []


def _fmt_runs(entry: dict[str, Any]) -> str:
    return " / ".join(f"{r['knn_top1']:.1f}" for r in entry.get("runs", [])) + " %"


def summary_line(family: str, result: dict[str, Any], entry: dict[str, Any] | None) -> str:
    """One line per family: the encoder beside its floor and baselines, and the time it took."""
    parts = [f"encoder {result.get('knn_top1', float('nan')):.1f} %"]
    if entry is not None:
        parts.append(f"floor {entry['floor']:.1f} %")
    for key, label in (("random_init_knn_top1", "random init"), ("pixels_knn_top1", "raw pixels")):
        if key in result:
            parts.append(f"{label} {result[key]:.1f} %")
    took = f"{result['wall_s']:.0f} s wall, {result['cpu_s']:.0f} s CPU" if "wall_s" in result else ""
    return f"[regression] {family}: kNN top-1 " + ", ".join(parts) + (f" ({took})" if took else "")


# --------------------------------------------------------------------------------------------
# measuring: one pretraining process per family


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def run_family(config: str | Path, *, seed: int | None = None, output_dir: Path, run_name: str,
               overrides: Sequence[str] = (), root: Path = ROOT) -> dict[str, Any]:
    """Pretrain + kNN-evaluate one config in a child process; its summary plus wall/CPU seconds and
    the precision and threads the run chose (parsed from its start-up line)."""
    args = [sys.executable, str(root / "pretrain.py"), "--config", str(root / config),
            f"train.output_dir={output_dir}", f"train.run_name={run_name}", "train.resume=never", *overrides]
    if seed is not None:
        args.append(f"train.seed={seed}")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])))
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the README's commands: threads sleep instead of spinning
    for key, value in CPU_CLASS.items():  # the protocol the floors were measured on; a caller's value wins
        env.setdefault(key, value)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(args, env=env, cwd=root, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
        print("\n".join(lines[-15:]), file=sys.stderr)  # the context; the failure itself is one line
        raise RuntimeError(f"pretraining {config} failed (exit {proc.returncode}): {lines[-1] if lines else 'no output'}")
    summary = json.loads((Path(output_dir) / run_name / "summary.json").read_text())
    summary["wall_s"] = round(wall, 1)
    summary["cpu_s"] = round((after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), 1)
    if m := re.search(r"precision=(\w+)", proc.stdout):
        summary["precision"] = m.group(1)
    if m := re.search(r"CPU (with|without) native bf16: (\w+)", proc.stdout):  # what the child ran on
        summary["native_bf16"], summary["isa"] = m.group(1) == "with", m.group(2)
    if m := re.search(r"threads=(\d+)", proc.stdout):
        summary["threads"] = int(m.group(1))
    if seed is not None:
        summary["seed"] = seed
    return summary


def machine_info(result: dict[str, Any] | None = None) -> dict[str, Any]:
    """The machine a figure was measured on: CPU model, the ISA ATen used, native bf16, threads, precision."""
    import torch

    from selfsup.hardware import cpu_isa, cpu_native_bf16, usable_cores

    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    result = result or {}
    return {
        "cpu_model": model,
        "isa": result.get("isa", cpu_isa()),  # as the run saw it (its start-up line), else this process
        "native_bf16": result.get("native_bf16", cpu_native_bf16()),  # False under ONEDNN_MAX_CPU_ISA=AVX2
        "hardware_bf16": bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()),
        "threads": result.get("threads", torch.get_num_threads()),
        "precision": result.get("precision", "?"),
        "usable_cores": usable_cores(),
        "env": {k: os.environ.get(k, CPU_CLASS[k]) for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")},
        "torch": torch.__version__,
    }


def git_commit(root: Path = ROOT) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True,
                               text=True, check=False).stdout.strip()
        return out.stdout.strip() + ("+uncommitted" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def floor_entry(config: str, runs: list[dict[str, Any]], root: Path = ROOT) -> dict[str, Any]:
    """A family's floor entry from >= 2 fresh runs: the floor sits below the lowest run by a noise margin."""
    if len(runs) < 2:
        raise ValueError("a floor needs at least 2 runs (e.g. 2 seeds) to see the run-to-run noise")
    top1 = [r["knn_top1"] for r in runs]
    spread = max(top1) - min(top1)
    noise = max(MIN_NOISE, NOISE_FACTOR * spread)
    floor = math.floor((min(top1) - noise) * 2) / 2  # down to half a point
    below_pixels = max(r["pixels_knn_top1"] - r["knn_top1"] for r in runs)
    pixels_margin = math.ceil((max(0.0, below_pixels) + noise) * 2) / 2
    lowest_gain = min(r["knn_top1"] - r["random_init_knn_top1"] for r in runs)
    if lowest_gain <= RANDOM_INIT_MARGIN + noise:
        raise ValueError(f"{config}: the encoder beats random init by only {lowest_gain:.1f} points in one run; "
                         f"a floor needs more than {RANDOM_INIT_MARGIN + noise:.1f} (margin + noise)")
    ci = runs[0]  # the config's own seed: what CI runs
    return {
        "config": config,
        "config_sha256": file_sha256(root / config),
        "floor": floor,
        "random_init_margin": RANDOM_INIT_MARGIN,
        "pixels_margin": pixels_margin,
        "measured": round(ci["knn_top1"], 2),
        "random_init_knn_top1": round(ci["random_init_knn_top1"], 2),
        "pixels_knn_top1": round(ci["pixels_knn_top1"], 2),
        "runs": [{k: round(r[k], 2) if isinstance(r[k], float) else r[k] for k in ("seed", "knn_top1", "random_init_knn_top1", "pixels_knn_top1", "wall_s", "cpu_s")
                  if k in r} for r in runs],
        "how_chosen": (
            f"floor = lowest of {len(runs)} runs ({min(top1):.1f} %) minus max({MIN_NOISE:g}, {NOISE_FACTOR:g} x their "
            f"spread {spread:.1f}) = {noise:.1f} points of run-to-run noise (seeds change the init, the batch order and "
            f"the kNN subsets, so the spread over-covers what a fixed seed on another CPU varies), rounded down to "
            f"0.5; pixels_margin = the most any run sat below raw pixels ({below_pixels:+.1f}) plus the same noise, "
            f"rounded up to 0.5; random_init_margin = {RANDOM_INIT_MARGIN:g} points (the lowest run cleared random init "
            f"by {lowest_gain:.1f})."),
        "date": _dt.date.today().isoformat(),
        "commit": git_commit(root),
        "machine": machine_info(ci),
    }


def load_floor(path: Path = FLOOR_FILE) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


PROTOCOL = ("kNN top-1 (k=200, T=0.1, cosine) of the pretrained encoder on fixed Fashion-MNIST subsets "
            "(eval.max_train_samples / eval.max_test_samples of each config, drawn by train.seed), beside the same "
            "backbone at random init and raw pixels on the same subsets; fp32 on the AVX2 class "
            "(ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2, as .ci/run sets).")


# --------------------------------------------------------------------------------------------
# the command


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--floor", type=Path, default=FLOOR_FILE, help="floor JSON (default tests/regression_floor.json)")
    parser.add_argument("--family", action="append", choices=sorted(FAMILIES),
                        help="only this family (repeatable); default: every family in the floor file")
    parser.add_argument("--update-floor", action="store_true",
                        help="measure each family on --seeds and rewrite the floor JSON (a deliberate commit; never in CI)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="seeds for --update-floor; the first should be the config's own (CI's run), its figures are stored as "
             "the measured ones (default: the config's seed and the next one)")
    parser.add_argument("--output-dir", type=Path, default=None, help="keep the runs here (default: a temporary folder)")
    return parser.parse_args(argv)


Runner = Callable[..., dict[str, Any]]


def main(argv: Sequence[str] | None = None, runner: Runner = run_family) -> int:
    """0 when every family clears its floor and baselines; 1 (one line per failure) otherwise."""
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="selfsup-regression-") as tmp:
        output_dir = args.output_dir or Path(tmp)
        if args.update_floor:
            return update_floor(args, output_dir, runner)
        return check(args, output_dir, runner)


def check(args: argparse.Namespace, output_dir: Path, runner: Runner) -> int:
    if not args.floor.is_file():
        print(f"[regression] FAIL: no floor file {args.floor}; create it with `python tools/regression.py --update-floor`")
        return 1
    stored = load_floor(args.floor)["families"]
    families = args.family or list(stored)
    failures: list[str] = []
    for family in families:
        if family not in stored:
            failures.append(f"{family}: no floor stored in {args.floor}; measure one with --update-floor --family {family}")
            continue
        entry = stored[family]
        if problems := check_config_unchanged(family, entry):
            failures += problems
            continue
        try:
            result = runner(entry["config"], output_dir=output_dir, run_name=family)
        except (RuntimeError, FileNotFoundError, json.JSONDecodeError) as e:
            failures.append(f"{family}: the run did not finish: {e}")
            continue
        print(summary_line(family, result, entry), flush=True)
        failures += check_family(family, result, entry)
    for line in failures:
        print(f"[regression] FAIL {line}")
    if not failures:
        print(f"[regression] passed: {', '.join(families)}")
    return 1 if failures else 0


def update_floor(args: argparse.Namespace, output_dir: Path, runner: Runner) -> int:
    families = args.family or list(FAMILIES)
    data = load_floor(args.floor) if args.floor.is_file() else {}
    data["protocol"] = PROTOCOL
    data.setdefault("families", {})
    for family in families:
        config = FAMILIES[family]
        seeds = args.seeds or [_config_seed(config), _config_seed(config) + 1]
        runs = []
        for seed in seeds:
            result = runner(config, seed=seed, output_dir=output_dir, run_name=f"{family}-seed{seed}")
            result.setdefault("seed", seed)
            print(summary_line(f"{family} seed {seed}", result, None), flush=True)
            runs.append(result)
        try:
            data["families"][family] = floor_entry(config, runs)
        except ValueError as e:
            print(f"[regression] FAIL {family}: {e}")
            return 1
        print(f"[regression] {family}: floor {data['families'][family]['floor']:.1f} % "
              f"({data['families'][family]['how_chosen']})")
    args.floor.write_text(json.dumps(data, indent=2) + "\n")
    print(f"[regression] wrote {args.floor}; review and commit it deliberately")
    return 0


def _config_seed(config: str) -> int:
    from selfsup.config import load_config

    return load_config(ROOT / config).train.seed


if __name__ == "__main__":
    sys.exit(main())
