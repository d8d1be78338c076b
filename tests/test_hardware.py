"""The precision and threads/workers rules (selfsup/hardware.py), with the hardware queries mocked."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from selfsup import hardware
from selfsup.config import load_config

CONFIGS = sorted(p for p in Path(__file__).resolve().parents[1].glob("configs/**/*.yaml")
                 if "accelerate" not in p.parts)  # configs/accelerate/: Accelerate's launch configs, not ours


def machine(monkeypatch, *, cuda: bool, cuda_bf16: bool = False, cpu_bf16: bool = False, isa: str = "AVX2"):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: cuda_bf16)
    monkeypatch.setattr(hardware, "cpu_native_bf16", lambda: cpu_bf16)
    monkeypatch.setattr(hardware, "cpu_native_fp16", lambda: False)
    monkeypatch.setattr(hardware, "cpu_isa", lambda: isa)


# (machine, requested) -> (mode, warned)
CASES = {
    ("cuda_bf16", "auto"): ("bf16", False),
    ("cuda_bf16", "no"): ("no", False),
    ("cuda_bf16", "bf16"): ("bf16", False),
    ("cuda_bf16", "fp16"): ("fp16", False),
    ("cuda_old", "auto"): ("fp16", False),
    ("cuda_old", "no"): ("no", False),
    ("cuda_old", "bf16"): ("bf16", True),
    ("cuda_old", "fp16"): ("fp16", False),
    ("cpu_native", "auto"): ("bf16", False),
    ("cpu_native", "no"): ("no", False),
    ("cpu_native", "bf16"): ("bf16", False),
    ("cpu_native", "fp16"): ("fp16", True),
    ("cpu_avx2", "auto"): ("no", False),
    ("cpu_avx2", "no"): ("no", False),
    ("cpu_avx2", "bf16"): ("bf16", True),
    ("cpu_avx2", "fp16"): ("fp16", True),
}
MACHINES = {
    "cuda_bf16": dict(cuda=True, cuda_bf16=True),
    "cuda_old": dict(cuda=True, cuda_bf16=False),
    "cpu_native": dict(cuda=False, cpu_bf16=True, isa="AVX512"),
    "cpu_avx2": dict(cuda=False, cpu_bf16=False, isa="AVX2"),
}


@pytest.mark.parametrize("kind,requested", sorted(CASES))
def test_precision_rule(monkeypatch, kind, requested):
    machine(monkeypatch, **MACHINES[kind])
    device = "cuda" if MACHINES[kind]["cuda"] else "cpu"
    choice = hardware.choose_precision(requested, device)
    mode, warned = CASES[(kind, requested)]
    assert choice.mode == mode
    assert (choice.warning is not None) == warned
    if warned:  # names the slowdown's cause and the fix
        assert "train.precision" in choice.warning and ("auto" in choice.warning or "no" in choice.warning)
    if kind == "cpu_avx2" and requested == "auto":
        assert choice.describe() == "precision=no (CPU without native bf16: AVX2)"


def test_unknown_precision_names_the_key():
    with pytest.raises(ValueError, match="train.precision"):
        hardware.choose_precision("bfloat16", "cpu")


def test_native_bf16_needs_the_units_and_onednn(monkeypatch):
    """AVX-512 without BF16 (Skylake) passes oneDNN's own check but emulates bf16: not native."""
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    assert not hardware.cpu_native_bf16()
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert hardware.cpu_native_bf16()
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)  # ONEDNN_MAX_CPU_ISA=AVX2
    assert not hardware.cpu_native_bf16()


def test_make_accelerator_applies_and_prints_the_rule(monkeypatch, capsys):
    from accelerate.state import AcceleratorState

    from selfsup.engine import make_accelerator

    machine(monkeypatch, cuda=False, cpu_bf16=False, isa="AVX2")
    monkeypatch.setattr(hardware.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    threads = torch.get_num_threads()
    try:
        accelerator = make_accelerator(load_config(None, ["train.precision=auto"]))
        out = capsys.readouterr().out
        assert accelerator.mixed_precision == "no"
        assert "precision=no (CPU without native bf16: AVX2)" in out
        assert "threads=2 workers=0 (2 usable cores" in out
        assert torch.get_num_threads() == 2
        AcceleratorState._reset_state(True)
        accelerator = make_accelerator(load_config(None, ["train.precision=bf16", "train.threads=1"]))
        out = capsys.readouterr().out
        assert accelerator.mixed_precision == "bf16"
        assert out.count("warning:") == 1 and "emulated" in out
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("cores", [1, 2, 4, 16])
@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("cpu_views", [True, False])
def test_threads_and_workers_fit_the_usable_cores(monkeypatch, cores, device, cpu_views):
    monkeypatch.setattr(hardware.os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    for processes in (1, 2):
        plan = hardware.choose_parallelism(None, None, device_type=device, local_processes=processes,
                                           cpu_views=cpu_views)
        share = max(1, cores // processes)
        assert plan.threads >= 1 and plan.workers >= 0
        assert plan.threads + plan.workers <= share
        assert f"{cores} usable cores" in plan.reason
        if device == "cpu" and not cpu_views:  # views on the device: every core trains
            assert (plan.threads, plan.workers) == (share, 0)
    expected = {  # (device, cpu_views, cores) -> (threads, workers) for one process
        ("cpu", True, 1): (1, 0), ("cpu", True, 2): (2, 0), ("cpu", True, 4): (3, 1), ("cpu", True, 16): (12, 4),
        ("cuda", True, 1): (1, 0), ("cuda", True, 2): (1, 1), ("cuda", True, 16): (4, 8),
        ("cuda", False, 16): (4, 2),
    }
    if (device, cpu_views, cores) in expected:
        plan = hardware.choose_parallelism(None, None, device_type=device, cpu_views=cpu_views)
        assert (plan.threads, plan.workers) == expected[(device, cpu_views, cores)]


def test_set_values_win(monkeypatch):
    monkeypatch.setattr(hardware.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    plan = hardware.choose_parallelism(3, 5, device_type="cpu")
    assert (plan.threads, plan.workers) == (3, 5) and "set in the config" in plan.reason
    plan = hardware.choose_parallelism(None, 1, device_type="cpu")
    assert (plan.threads, plan.workers) == (2, 1)  # a set worker count does not move the auto threads
    with pytest.raises(ValueError, match="train.threads"):
        hardware.choose_parallelism(0, None, device_type="cpu")


def test_affinity_is_the_core_count(monkeypatch):
    monkeypatch.setattr(hardware.os, "sched_getaffinity", lambda pid: {3}, raising=False)
    monkeypatch.setattr(hardware.os, "cpu_count", lambda: 64)
    assert hardware.usable_cores() == 1


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(p.parents[1])))
def test_no_shipped_config_forces_an_emulated_precision(monkeypatch, path):
    """On the CI machine class (CPU without native bf16) no shipped config asks for bf16/fp16."""
    machine(monkeypatch, cuda=False, cpu_bf16=False, isa="AVX2")
    cfg = load_config(path)
    choice = hardware.choose_precision(cfg.train.precision, "cpu")
    assert choice.warning is None, f"{path.name}: train.precision={cfg.train.precision}; use auto"
    if "compare" in path.parts:  # a side-by-side with another library pins fp32 on both sides, on purpose
        assert cfg.train.precision == "no"
    else:
        assert cfg.train.precision == "auto"


@pytest.mark.parametrize("preset,expected", [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_commands_let_openmp_threads_sleep_unless_the_user_chose(preset, expected):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if preset:
        env["OMP_WAIT_POLICY"] = preset
    code = "import os, selfsup.cli.knn, sys; print(os.environ['OMP_WAIT_POLICY'], 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1]).stdout.split()
    assert out == [expected, "False"]  # set before torch (and so libgomp) is loaded


# In a fresh interpreter: malloc and free a 64 MB block, and read glibc's own counters (mallinfo2): bytes in
# mmapped blocks and the heap's size while it is held, and the heap's size after the free. `keep` runs
# keep_freed_memory() first (importing selfsup, so torch: the heap is already large then).
MALLINFO_PROBE = """
import ctypes, sys
class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
if sys.argv[1] == "keep":
    from selfsup.hardware import keep_freed_memory
    print(keep_freed_memory(), file=sys.stderr)
block = libc.malloc(64 << 20)
held = libc.mallinfo2()
libc.free(block)
print(held.hblkhd, held.arena, libc.mallinfo2().arena)
"""


def malloc_probe(mode: str, **env: str) -> tuple[int, int, int, str]:
    import os
    import subprocess
    import sys

    unset = (*hardware.ALLOCATOR_ENV, "GLIBC_TUNABLES", "SELFSUP_MALLOC")
    clean = {k: v for k, v in os.environ.items() if k not in unset}
    done = subprocess.run([sys.executable, "-c", MALLINFO_PROBE, mode], env={**clean, **env}, capture_output=True,
                          text=True, check=True, cwd=Path(__file__).resolve().parents[1])
    mmapped, heap_held, heap_after = map(int, done.stdout.split())
    return mmapped, heap_held, heap_after, done.stderr.strip()


@pytest.mark.skipif(hardware.platform.libc_ver()[0] != "glibc", reason="glibc's allocator only")
def test_keep_freed_memory_serves_large_blocks_from_a_heap_that_is_not_trimmed():
    block = 64 << 20
    mmapped, _, _, _ = malloc_probe("plain")
    assert mmapped >= block  # glibc's defaults: a fresh mmap (unmapped again on free)
    mmapped, heap_held, heap_after, said = malloc_probe("keep")
    assert said == "malloc: freed memory kept (glibc mallopt)"
    assert mmapped < block and heap_held >= block  # from the heap ...
    assert heap_after == heap_held  # ... which is not trimmed after the free
    for env in ({"SELFSUP_MALLOC": "default"}, {"MALLOC_TRIM_THRESHOLD_": "131072"},  # the user's choice wins
                {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=131072"}):
        mmapped, _, _, said = malloc_probe("keep", **env)
        assert mmapped >= block, (env, said)
