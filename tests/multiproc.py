"""Launch a worker script in several CPU processes, the way users launch training.

`accelerate launch --multi_gpu --num_processes N` plus `Accelerator(cpu=True)` inside the worker
starts N gloo processes (`--cpu --num_processes N` silently starts one). Workers must assert the
world size themselves and call `accelerator.end_training()` before exiting.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
WORKERS_DIR = Path(__file__).resolve().parent / "workers"

# Variables of an enclosing launcher would make the workers join the wrong process group.
_LAUNCHER_ENV = (
    "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT",
    "TORCHELASTIC_RUN_ID", "ACCELERATE_USE_CPU", "ACCELERATE_MIXED_PRECISION", "ACCELERATE_CONFIG_FILE",
)


def free_port() -> int:
    """A TCP port the OS reports free right now (bind to port 0); tiny race, retried on clash."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(script: Path, args: tuple[str, ...], nprocs: int, timeout: float) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--multi_gpu", "--num_processes", str(nprocs), "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()),
        str(script), *args,
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_ENV}
    env["OMP_NUM_THREADS"] = "1"  # 2 processes on 2 cores: no thread oversubscription
    # The workers must import this checkout's selfsup, not another one installed in editable mode.
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env["PYTHONUNBUFFERED"] = "1"
    return subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def run_workers(script: Path, *args: str, nprocs: int = 2, timeout: float = 180) -> subprocess.CompletedProcess:
    """Run `script args` in `nprocs` CPU processes; fail the test with both logs unless all exit 0."""
    result = _launch(Path(script), tuple(str(a) for a in args), nprocs, timeout)
    if result.returncode != 0 and "address already in use" in (result.stderr + result.stdout).lower():
        result = _launch(Path(script), tuple(str(a) for a in args), nprocs, timeout)  # port taken meanwhile
    assert result.returncode == 0, (
        f"{Path(script).name} failed with exit code {result.returncode}\n"
        f"--- stdout ---\n{result.stdout}\n--- stderr ---\n{result.stderr}"
    )
    return result
