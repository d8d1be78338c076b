"""What this machine can do fast, asked once at start: the precision and the CPU threads/workers.

Nothing here assumes the hardware. bf16 autocast on a CPU without native bf16 units (AVX2-only laptops
and many cloud VMs) is emulated by oneDNN: a timm ResNet-18 step is 18-38x slower than in fp32 there
(docs/performance.md). So `auto` picks bf16 only where the CPU has AVX-512-BF16 or AMX, fp16 with loss
scaling on GPUs without bf16, and fp32 otherwise; an explicit choice that would be emulated is kept
but warned about. Threads and DataLoader workers are sized from the cores this process may use
(`os.sched_getaffinity`), shared among the processes of this machine, so they never oversubscribe.
On glibc, freed memory is kept in the process (`keep_freed_memory`) instead of going back to the kernel
and being faulted in again at the next step. Written here because neither torch nor Accelerate makes
these choices.
"""

from __future__ import annotations

import ctypes
import os
import platform
from dataclasses import dataclass

import torch

__all__ = ["PrecisionChoice", "Parallelism", "choose_precision", "choose_parallelism", "usable_cores",
           "cpu_native_bf16", "cpu_native_fp16", "cpu_isa", "plan_parallelism", "loader_workers",
           "local_processes", "training_device_type", "keep_freed_memory"]

PRECISIONS = ("auto", "no", "bf16", "fp16")
EMULATED_SLOWDOWN = "18-38x slower than fp32"  # measured: ResNet-18 steps on AVX2-only CPUs, docs/performance.md


@dataclass(frozen=True)
class PrecisionChoice:
    """Accelerate's mixed_precision value, why it was chosen, and a warning when it will be slow."""

    mode: str  # no | bf16 | fp16
    reason: str
    warning: str | None = None

    def describe(self) -> str:
        return f"precision={self.mode} ({self.reason})"


def cpu_isa() -> str:
    """The vector ISA ATen dispatches to here (AVX2, AVX512, ...); honours ATEN_CPU_CAPABILITY."""
    return torch.backends.cpu.get_cpu_capability()


def cpu_native_bf16() -> bool:
    """bf16 matmul/conv units (AVX-512-BF16 or AMX) that oneDNN may use (not capped by ONEDNN_MAX_CPU_ISA)."""
    hardware = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return bool(hardware and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def cpu_native_fp16() -> bool:
    """fp16 matmul units (AMX-FP16); everywhere else CPU fp16 autocast is emulated."""
    return bool(torch.cpu._is_amx_fp16_supported() and torch.ops.mkldnn._is_mkldnn_fp16_supported())


def choose_precision(requested: str, device_type: str) -> PrecisionChoice:
    """`auto`: bf16 on a CUDA GPU with bf16, fp16 (with loss scaling) on older GPUs, bf16 on a CPU with
    native bf16, else fp32 (`no`). An explicit choice wins, with a warning where it would be emulated."""
    if requested not in PRECISIONS:
        raise ValueError(f"train.precision must be one of {', '.join(PRECISIONS)}, got {requested!r}; use auto.")
    if device_type == "cuda":
        has_bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
        if requested == "auto":
            if has_bf16:
                return PrecisionChoice("bf16", "CUDA GPU with bf16")
            return PrecisionChoice("fp16", "CUDA GPU without bf16: fp16 with loss scaling")
        if requested == "bf16" and not has_bf16:
            return PrecisionChoice("bf16", "set in the config", warning=(
                "train.precision=bf16 on a GPU without native bf16 runs emulated and slow; "
                "set train.precision=auto (fp16 with loss scaling here) or no."))
        return PrecisionChoice(requested, "set in the config")

    isa = cpu_isa()
    bf16, fp16 = cpu_native_bf16(), cpu_native_fp16()
    if requested == "auto":
        if bf16:
            return PrecisionChoice("bf16", f"CPU with native bf16: {isa}")
        return PrecisionChoice("no", f"CPU without native bf16: {isa}")
    if (requested == "bf16" and not bf16) or (requested == "fp16" and not fp16):
        return PrecisionChoice(requested, "set in the config", warning=(
            f"train.precision={requested} on a CPU without native {requested} ({isa}): autocast is emulated, "
            f"{EMULATED_SLOWDOWN}. Set train.precision=auto (or no) to train in fp32 here."))
    return PrecisionChoice(requested, "set in the config")


@dataclass(frozen=True)
class Parallelism:
    """Intra-op threads of this process and its DataLoader workers, and why."""

    threads: int
    workers: int
    reason: str

    def describe(self) -> str:
        return f"threads={self.threads} workers={self.workers} ({self.reason})"


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity: taskset, cgroups cpusets, SLURM), not the machine's."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # macOS / Windows have no affinity query
        return max(1, os.cpu_count() or 1)


def choose_parallelism(
    threads: int | None,
    workers: int | None,
    *,
    device_type: str,
    local_processes: int = 1,
    cpu_views: bool = True,
) -> Parallelism:
    """Split the cores this process may use between intra-op threads and DataLoader workers.

    Each of the `local_processes` processes on this machine gets an equal share. On a CPU run the
    threads do the training: with 1-2 cores every core is an intra-op thread and the views are made in
    the main process (no workers), with more a quarter of the share makes per-image views in workers
    (none when `cpu_views` is False, i.e. views are made on the device) and threads take the rest, so
    threads + workers never exceed the share. Measured on 2 AVX2 cores, fp32 (docs/performance.md): 2
    threads + 0 workers beat 1 + 1 idle (109 vs 97 img/s) and match it with a busy neighbour (79 vs 80)
    once OpenMP threads sleep instead of spinning (OMP_WAIT_POLICY=PASSIVE, which the commands set).
    On a GPU run the workers feed the GPU, so they get the share less one core for the main process.
    A value set in the config wins; the share is still printed.
    """
    cores = usable_cores()
    share = max(1, cores // max(1, local_processes))
    source = f"{cores} usable cores" + (f" / {local_processes} processes" if local_processes > 1 else "")
    if device_type == "cpu" and os.environ.get("OMP_WAIT_POLICY"):
        source += f", OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}"
    if device_type == "cuda":
        auto_workers = min(8, share - 1) if cpu_views else min(2, share - 1)
        auto_threads = max(1, min(4, share - auto_workers))
    elif not cpu_views:
        auto_workers, auto_threads = 0, share
    else:
        auto_workers = 0 if share <= 2 else max(1, share // 4)
        auto_threads = max(1, share - auto_workers)
    chosen_threads = threads if threads is not None else auto_threads
    chosen_workers = workers if workers is not None else auto_workers
    set_by = [name for name, value in (("threads", threads), ("workers", workers)) if value is not None]
    reason = source + (f"; {' and '.join(set_by)} set in the config" if set_by else "")
    if threads is not None and threads < 1:
        raise ValueError(f"train.threads must be >= 1 or null (auto), got {threads}.")
    if workers is not None and workers < 0:
        raise ValueError(f"data.num_workers must be >= 0 or null (auto), got {workers}.")
    return Parallelism(chosen_threads, chosen_workers, reason)


def local_processes() -> int:
    """Training processes on this machine (torchrun and `accelerate launch` set LOCAL_WORLD_SIZE)."""
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))


def training_device_type() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def plan_parallelism(threads: int | None, workers: int | None, augment_on: str = "workers") -> Parallelism:
    """`choose_parallelism` for this process: its device, the processes beside it, where views are made."""
    return choose_parallelism(threads, workers, device_type=training_device_type(),
                              local_processes=local_processes(), cpu_views=augment_on != "device")


def loader_workers(data_cfg) -> int:
    """DataLoader workers for `data_cfg` (data.num_workers, or the auto choice when it is null)."""
    return plan_parallelism(None, data_cfg.num_workers, data_cfg.augment_on).workers


# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
MMAP_THRESHOLD = 1 << 30  # blocks up to 1 GB from the heap: iBOT's [6272, 4096] fp32 logits are 100 MB
ALLOCATOR_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")


def keep_freed_memory() -> str:
    """Make glibc's malloc keep freed memory in the process; returns what was done, for the start-up line.

    By default glibc serves blocks above a threshold with fresh mmaps and returns the top of the heap to
    the kernel once enough of it is free, so every training step faults its activations in again page by
    page: a BYOL step on one fp32 CPU thread spent 14-26 % of its time in the kernel (docs/performance.md).
    Here blocks up to 1 GB come from the heap, which is never trimmed; the cost is a resident size that
    stays at the step's peak. Allocator settings in the environment (MALLOC_*_, glibc.malloc.* in
    GLIBC_TUNABLES) or SELFSUP_MALLOC=default leave glibc as it is; other C libraries are left alone.
    """
    if os.environ.get("SELFSUP_MALLOC", "").lower() == "default":
        return "malloc: glibc defaults (SELFSUP_MALLOC=default)"
    if any(name in os.environ for name in ALLOCATOR_ENV) or "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return "malloc: as the environment sets it"
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return "malloc: the C library's defaults"
    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    done = all([mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD), mallopt(M_TRIM_THRESHOLD, 2**31 - 1),
                mallopt(M_TOP_PAD, 64 << 20)])
    return "malloc: freed memory kept (glibc mallopt)" if done else "malloc: glibc refused mallopt, defaults"
