"""Where a pretraining step's time goes: view pipeline, full step, bare backbone, real DataLoader, memory.

    python tools/benchmark.py --config configs/benchmark/simclr_r18_32px.yaml [section.key=value ...]
        [--device auto|cpu|cuda] [--threads N] [--warmup 3] [--steps 5] [--repeats 3]
        [--sweep method.mask_ratio=0.5,0.75,0.9] [--json out.json] [--markdown docs/performance.md]

Figures (images = dataset images; each becomes `num_views` views), each the median of `--repeats`
windows of `--steps` after `--warmup`:
- view pipeline per worker (1 thread, as in a DataLoader worker): decode, per-image torchvision views,
  and the batched views of selfsup.batched_views on CPU (and on the device when it is a GPU);
- step: the real `engine.fit` on batches already in memory on the device (views, or uint8 images
  plus the on-device views when data.augment_on=device);
- bare: the backbone's own passes alone on the same views (`Method.backbone_passes`: forward + backward,
  and forward-only where the method has a momentum encoder), same precision/layout/compile, in windows
  alternating with the step's (same load on a shared machine);
- method_overhead = step time / bare time (everything that is not the backbone), median of adjacent pairs;
- end_to_end: `engine.fit` with the real DataLoader (data.num_workers workers);
- peak memory (CUDA: max allocated in the step and end-to-end runs; CPU: the process's peak RSS).
One process (no `accelerate launch`). Timing lives here and never in a test. Also `selfsup-benchmark ...`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from selfsup.cli.benchmark_report import machine, print_summary, write_markdown



def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. data.batch_size=128")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--threads", type=int, default=None,
                        help="intra-op threads for the step (= train.threads; default: the engine's choice from the usable cores)")
    parser.add_argument("--warmup", type=int, default=3, help="steps before timing (CPU bf16+channels_last needs ~8)")
    parser.add_argument("--steps", type=int, default=5, help="steps per timed window")
    parser.add_argument("--repeats", type=int, default=3, help="timed windows; the median is reported")
    parser.add_argument("--sweep", default=None, help="KEY=v1,v2,...: step and bare at each value (e.g. MAE mask ratio)")
    parser.add_argument("--skip", default="", help="comma list of phases to skip: views, step (and bare), bare, end_to_end")
    parser.add_argument("--label", default=None, help="row name in the markdown table (default: config stem + overrides)")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--markdown", default=None, help="add/replace this run's row in this markdown file")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    parser.add_argument("--debug", action="store_true", help="show the traceback of a failure (without it, a mistake "
                        "you can fix prints one line 'error: ...')")
    args = parser.parse_args(argv)
    if min(args.warmup, args.steps, args.repeats) < 1:
        parser.error("--warmup, --steps and --repeats must be >= 1")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.print_config:  # before torch: the config alone
        from selfsup.cli.common import print_config
        from selfsup.config import ConfigError, load_config

        try:
            return print_config(load_config(args.config, list(args.overrides)))
        except ConfigError as e:
            sys.exit(f"config error: {e}")
    if args.device == "cpu" and "torch" not in sys.modules:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch initialises CUDA
    import torch

    if args.device == "cpu" and torch.cuda.is_available():
        sys.exit("--device cpu: torch was imported before the tool could hide the GPU; run the tool as its own process")

    from selfsup.config import ConfigError, load_config

    overrides = list(args.overrides) + ([f"train.threads={args.threads}"] if args.threads else [])
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as e:
        sys.exit(f"config error: {e}")
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device here; use --device cpu")
    skip = {s for s in args.skip.split(",") if s}
    load_at_start = os.getloadavg()[0]
    result: dict[str, Any] = {
        "config": args.config, "overrides": list(args.overrides), "machine": machine(), "settings": {
            "warmup": args.warmup, "steps": args.steps, "repeats": args.repeats, "threads": cfg.train.threads or "auto",
            "num_workers": cfg.data.num_workers if cfg.data.num_workers is not None else "auto"},
        "method": cfg.method.name, "backbone": cfg.backbone.name, "image_size": cfg.data.image_size,
        "batch_size": cfg.data.batch_size, "augment_on": cfg.data.augment_on, "precision": cfg.train.precision,
        "channels_last": cfg.train.channels_last, "compile": cfg.train.compile,
    }
    with tempfile.TemporaryDirectory(prefix="selfsup_bench_") as tmp:
        cfg = bench_config(cfg, tmp)
        result["device"] = "cuda" if torch.cuda.is_available() else "cpu"
        if "views" not in skip:
            result["view_pipeline"] = measure_views(cfg, args)
        if "step" not in skip:
            result.update(measure_fit(cfg, args, real_loader=False, bare="bare" not in skip))
            result["precision"] = result["step"]["precision"]
        if "end_to_end" not in skip:
            result["end_to_end"] = measure_fit(cfg, args, real_loader=True)["step"]
        if args.sweep:
            result["sweep"] = measure_sweep(args, tmp)
    result["peak_memory_mb"] = peak_memory_mb(result)
    result["load_average"] = {"start": load_at_start, "end": os.getloadavg()[0]}  # other jobs on a shared machine
    print_summary(result)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
    if args.markdown:
        write_markdown(Path(args.markdown), result, args.label)
        for row in result.get("sweep", []):  # one more row per swept value: step and bare at that value
            swept = {k: v for k, v in result.items() if k not in ("view_pipeline", "end_to_end", "sweep")}
            swept.update(row, overrides=[*result["overrides"], row["override"]])
            write_markdown(Path(args.markdown), swept, f"{args.label} {row['override']}" if args.label else None)
    return result


def bench_config(cfg, tmp: str):
    """The run's config with everything that is not a training step switched off (eval, periodic checkpoints)."""
    train = dataclasses.replace(cfg.train, output_dir=tmp, run_name="bench", resume="never", trackers=[],
                                checkpoint_every_steps=0, max_steps=None)
    return dataclasses.replace(cfg, train=train, eval=dataclasses.replace(cfg.eval, at_end=False, every_epochs=0))


# ---------------------------------------------------------------------------------------------
# timing helpers


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def summarize(seconds: list[float], images: int, steps: int) -> dict[str, Any]:
    """Median over timed windows of `steps` steps of `images` images each."""
    per_s = [images * steps / s for s in seconds]
    return {"images_per_s": statistics.median(per_s), "step_ms": 1e3 * statistics.median(seconds) / steps,
            "windows_images_per_s": per_s}


# ---------------------------------------------------------------------------------------------
# phases


def measure_views(cfg, args) -> dict[str, Any]:
    """Images/s of one DataLoader worker (1 thread) on each augmentation path, and of the batched views on the device."""
    import torch

    from selfsup.batched_views import UInt8Images
    from selfsup.builders import build_pretraining, in_chans

    on_workers = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, augment_on="workers"))
    method, dataset, info = build_pretraining(on_workers)
    views = dataset.transform  # the per-image pipeline the workers path runs
    batched = _batched(cfg, method, info)
    count = min(cfg.data.batch_size, len(dataset.base))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        decode_s, augment_s, batched_s = [], [], []
        to_uint8 = UInt8Images(cfg.data.load_size or cfg.data.image_size, in_chans(cfg))
        for _ in range(args.repeats + 1):  # the first round warms up
            start = time.perf_counter()
            images = [dataset.base[i][0] for i in range(count)]
            decode_s.append(time.perf_counter() - start)
            start = time.perf_counter()
            for image in images:
                views(image)
            augment_s.append(time.perf_counter() - start)
            if batched is not None:
                start = time.perf_counter()
                batch = torch.stack([to_uint8(image) for image in images])
                batched.make_views(batch, torch.Generator().manual_seed(0))
                batched_s.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    med = lambda xs: statistics.median(xs[1:])  # noqa: E731
    out = {
        "num_views": getattr(views, "num_views", None),
        "images": count,
        "decode_images_per_s": count / med(decode_s),
        "per_image_augment_images_per_s": count / med(augment_s),
        "per_image_images_per_s": count / (med(decode_s) + med(augment_s)),
    }
    if batched is None:  # the method adds per-sample loader work: no device path
        return out
    out["batched_cpu_1thread_images_per_s"] = count / med(batched_s)  # uint8 conversion + batched views
    out["batched_speedup_per_core"] = out["batched_cpu_1thread_images_per_s"] / out["per_image_augment_images_per_s"]
    if torch.cuda.is_available():
        batch = batch.cuda()
        generator = torch.Generator(device="cuda").manual_seed(0)
        for _ in range(args.warmup):
            batched.make_views(batch, generator)
        seconds = []
        for _ in range(args.repeats):
            _sync()
            start = time.perf_counter()
            for _ in range(args.steps):
                batched.make_views(batch, generator)
            _sync()
            seconds.append(time.perf_counter() - start)
        out["batched_device_images_per_s"] = summarize(seconds, count, args.steps)["images_per_s"]
    return out


def _batched(cfg, method, info):
    """The batched views of this config, or None for a method the device path cannot run (SimMIM's masks)."""
    from selfsup.builders import build_batch_transform
    from selfsup.methods import Method

    if type(method).view_transform is not Method.view_transform:
        return None
    on_device = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, augment_on="device"))
    return build_batch_transform(on_device, method, info)


class InMemoryLoader:
    """Cycles a few batches already on the device: `fit` without any data loading."""

    sampler = None

    def __init__(self, batches: list, length: int) -> None:
        self.batches, self.length = batches, length
        self.batch_size = _first_tensor(batches[0]).shape[0]

    def __len__(self) -> int:
        return self.length

    def __iter__(self):
        for i in range(self.length):
            yield self.batches[i % len(self.batches)]


def _first_tensor(batch):
    while isinstance(batch, (list, tuple)):
        batch = batch[0]
    return batch


def measure_fit(cfg, args, *, real_loader: bool, bare: bool = False) -> dict[str, Any]:
    """Steps of the real `engine.fit`, timed at each optimizer step through the method's `after_step`.

    With `bare`, a copy of the backbone runs a window of forward + backward passes on the same views
    between the timed windows of steps, so both see the same load on a shared machine; the overhead
    is the median over these adjacent pairs.
    """
    import torch
    from accelerate.utils import set_seed

    from selfsup.builders import build_batch_transform, build_pretraining
    from selfsup.engine import fit, make_accelerator, make_loader
    from selfsup.hardware import loader_workers

    warmup, steps, repeats = args.warmup, args.steps, args.repeats
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_steps=warmup + steps * repeats))
    if not real_loader:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, num_workers=0))
    accelerator = make_accelerator(cfg)
    set_seed(cfg.train.seed)
    method, dataset, info = build_pretraining(cfg)
    transform = build_batch_transform(cfg, method, info)
    loader = make_loader(dataset, cfg.data, seed=cfg.train.seed)
    if not real_loader:
        loader = InMemoryLoader(_device_batches(loader, accelerator.device), cfg.train.max_steps + 1)
    bare_step = _bare_step(cfg, method, loader.batches[0], transform, accelerator) if bare else None

    ends: dict[int, float] = {}  # step -> time at the end of it, at window boundaries only (a sync there)
    resumes: dict[int, float] = {}  # step -> when fit goes on after it (later where a bare window ran)
    bare_seconds: list[float] = []
    inner = method.after_step

    def after_step(progress: float) -> None:
        inner(progress)
        step = after_step.calls = getattr(after_step, "calls", 0) + 1
        if step < warmup or (step - warmup) % steps:
            return  # no sync inside a window: the engine's own syncs are part of what is measured
        _sync()
        ends[step] = time.perf_counter()
        if bare_step is not None and len(bare_seconds) < repeats:
            if not bare_seconds:
                for _ in range(warmup):
                    bare_step()
                _sync()
            start = time.perf_counter()
            for _ in range(steps):
                bare_step()
            _sync()
            bare_seconds.append(time.perf_counter() - start)
        resumes[step] = time.perf_counter()

    method.after_step = after_step  # the instance attribute shadows the class method for this run only
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    run_dir = Path(tempfile.mkdtemp(dir=cfg.train.output_dir))  # metrics and the final checkpoint go here
    fit(method, loader, cfg, accelerator, run_dir=run_dir, batch_transform=transform)
    step_seconds = [ends[warmup + (k + 1) * steps] - resumes[warmup + k * steps] for k in range(repeats)]
    out: dict[str, Any] = {"step": summarize(step_seconds, cfg.data.batch_size, steps)}
    out["step"].update(num_workers=loader_workers(cfg.data), threads=torch.get_num_threads(),
                       precision=accelerator.mixed_precision)
    if torch.cuda.is_available():
        out["step"]["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
    if bare_step is not None:
        out["bare_backbone"] = summarize(bare_seconds, cfg.data.batch_size, steps)
        out["bare_backbone"]["views_per_step"] = bare_step.views
        out["method_overhead"] = statistics.median(s / b for s, b in zip(step_seconds, bare_seconds))
    accelerator.free_memory()
    return out


def _device_batches(loader, device, count: int = 2) -> list:
    """A couple of real batches (views, or uint8 images) moved to the device once."""
    from accelerate.utils import send_to_device

    batches = []
    for batch in loader:
        batches.append(send_to_device(batch, device))
        if len(batches) == count:
            break
    return batches


def _bare_step(cfg, method, batch, transform, accelerator):
    """The backbone passes of one step of the method (`Method.backbone_passes`) on a copy of its backbone:
    forward + backward on the trained views, forward without gradient on the others (e.g. MoCo's keys).
    """
    import copy

    import torch

    if transform is not None:  # uint8 images -> the views the method would see
        batch = transform(batch, generator=torch.Generator(device=accelerator.device).manual_seed(0))
    views = batch[0]
    trained, frozen = method.backbone_passes(list(views) if isinstance(views, (list, tuple)) else [views])
    x = _by_size(trained)  # one [V_s*B, C, S, S] batch per view size (multi-crop: global and local crops)
    x_frozen = _by_size(frozen)
    backbone = copy.deepcopy(method.encoder).to(accelerator.device).train()
    if cfg.train.channels_last:
        backbone = backbone.to(memory_format=torch.channels_last)
    if cfg.train.compile:
        backbone.compile()

    def step() -> None:
        with accelerator.autocast():
            with torch.no_grad():
                for batch in x_frozen:
                    backbone(batch)
            loss = sum(backbone(batch).float().mean() for batch in x)
        loss.backward()
        backbone.zero_grad(set_to_none=True)

    step.views = sum(int(batch.shape[0]) for batch in [*x, *x_frozen])
    return step


def _by_size(views: list) -> list:
    """Views of one size concatenated, in first-seen order: V x [B, C, S_v, S_v] -> [[V_s*B, C, S, S] per size]."""
    import torch

    groups: dict[tuple, list] = {}
    for view in views:
        groups.setdefault(tuple(view.shape[1:]), []).append(view)
    return [torch.cat(group) for group in groups.values()]


def measure_sweep(args, tmp: str) -> list[dict[str, Any]]:
    """Step and bare backbone with one more override per value, e.g. MAE's cost against its mask ratio."""
    from selfsup.config import load_config

    key, _, values = args.sweep.partition("=")
    if not key or not values:
        sys.exit(f"--sweep {args.sweep!r}: write KEY=v1,v2,... e.g. method.mask_ratio=0.5,0.75,0.9")
    rows = []
    for value in values.split(","):
        override = f"{key}={value}"
        cfg = bench_config(load_config(args.config, [*args.overrides, override]), tmp)
        rows.append({"override": override, **measure_fit(cfg, args, real_loader=False, bare=True)})
    return rows


# ---------------------------------------------------------------------------------------------
# reporting


def peak_memory_mb(result: dict[str, Any]) -> dict[str, Any]:
    cuda = [phase["cuda_max_allocated_mb"] for phase in (result.get("step"), result.get("end_to_end"))
            if phase and "cuda_max_allocated_mb" in phase]
    out: dict[str, Any] = {"process_max_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if cuda:
        out["cuda_max_allocated"] = max(cuda)
    return out


def cli() -> int:
    """`selfsup-benchmark`: a mistake the user can fix prints one line (`--debug`: the traceback)."""
    from selfsup.cli.common import exit_on_user_error

    exit_on_user_error(main)()
    return 0


if __name__ == "__main__":
    sys.exit(cli())
