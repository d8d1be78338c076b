"""The on-disk checkpoint format: one directory per saved step under a run's `checkpoints/`.

`<run>/checkpoints/step_00000042/` holds what `accelerate.save_state` writes (model weights as
safetensors, optimizer, every process's RNG state) plus `trainer_state.json`, the loop's position
(step, epoch, batches into the epoch, ...). The write is atomic: everything goes to `.tmp_step_...`,
the state file is written last and fsynced, then the directory is renamed into place. A directory
counts as a checkpoint only if it holds the state file, so a write cut short by a crash or kill is
ignored by `list_checkpoints` and `train.resume=auto` (its `.tmp_` directory is cleared by the next
save of that step). Only the newest `keep` checkpoints are kept (all when `keep` <= 0).
A complete checkpoint whose files were damaged later (a disk filling up, a copy cut short) is skipped
with a warning when resuming: `load_resume_checkpoint` falls back to the newest one that loads.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from accelerate import Accelerator

CHECKPOINT_PREFIX = "step_"
STATE_FILE = "trainer_state.json"


def save_checkpoint(accelerator: Accelerator, ckpt_root: Path, state: dict[str, Any], keep: int) -> Path:
    """Write model/optimizer/RNG state atomically: a crash mid-write leaves only a `.tmp` directory."""
    final = ckpt_root / f"{CHECKPOINT_PREFIX}{state['step']:08d}"
    tmp = ckpt_root / f".tmp_{final.name}"
    if accelerator.is_main_process:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _write_json_durably(tmp / STATE_FILE, state)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(ckpt_root)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete checkpoints (those with a state file), oldest first."""
    if not ckpt_root.is_dir():
        return []
    found = [p for p in ckpt_root.glob(f"{CHECKPOINT_PREFIX}*") if (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


class CheckpointLoadError(ValueError):
    """No checkpoint to resume from could be loaded (a ValueError: the command-line entry prints it as a message)."""


def resume_candidates(resume: str, ckpt_root: Path) -> list[Path]:
    """Checkpoints to try, newest first: with resume=auto every complete one under `ckpt_root` (so a
    corrupt newest one falls back to the one before), the one named by a path, none with resume=never."""
    if resume == "auto":
        return list_checkpoints(ckpt_root)[::-1]
    found = find_resume_checkpoint(resume, ckpt_root)
    return [found] if found is not None else []


def load_resume_checkpoint(accelerator: Accelerator, resume: str, ckpt_root: Path) -> tuple[Path | None, dict[str, Any]]:
    """Load the newest checkpoint that loads whole (`accelerator.load_state` + the loop's state file);
    (None, {}) when there is none to resume from. Each one skipped is reported with its error; when every
    candidate fails, CheckpointLoadError names the directory and the fixes."""
    failures: list[str] = []
    last_error: Exception | None = None
    for candidate in resume_candidates(resume, ckpt_root):
        try:
            state = json.loads((candidate / STATE_FILE).read_text())
            accelerator.load_state(str(candidate))
        except Exception as e:  # safetensors' SafetensorError, torch.load's EOFError / UnpicklingError, ...
            failures.append(f"{candidate.name}: {type(e).__name__}: {e}")
            last_error = e
            accelerator.print(
                f"[selfsup] warning: checkpoint {candidate} cannot be loaded ({type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else ''}); trying the previous one"
            )
            continue
        if failures:
            accelerator.print(f"[selfsup] resuming from {candidate}, the newest checkpoint that loads "
                              f"({len(failures)} newer one(s) skipped, left on disk)")
        return candidate, state
    if failures:
        where = ckpt_root if resume == "auto" else Path(resume)
        raise CheckpointLoadError(
            f"no checkpoint in {where} can be loaded ({'; '.join(f.splitlines()[0] for f in failures)}); "
            f"set train.resume=never to start over, or delete {where}"
        ) from last_error
    return None, {}


def find_resume_checkpoint(resume: str, ckpt_root: Path) -> Path | None:
    if resume == "never":
        return None
    if resume == "auto":
        found = list_checkpoints(ckpt_root)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(
            f"train.resume={resume!r}: no checkpoint there (a directory with {STATE_FILE}). "
            f"Use train.resume=auto to continue from the run directory's last checkpoint."
        )
    return path


def _write_json_durably(path: Path, obj: Any) -> None:
    with open(path, "w") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())
