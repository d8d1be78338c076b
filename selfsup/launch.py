"""Setting up a run on this machine: the Accelerator (precision, threads, processes), the trackers it logs to,
and the training DataLoader. What the loop itself does is engine.py."""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration
from torch.utils.data import DataLoader, Dataset, IterableDataset

from selfsup.config import Config, ConfigError, DataConfig
from selfsup.guards import _ignore_stop_signals
from selfsup.hardware import choose_precision, keep_freed_memory, loader_workers, plan_parallelism
from selfsup.sampling import EpochSampler
from selfsup.sharding import fsdp_requested_but_off


def make_accelerator(cfg: Config, run_dir: str | Path | None = None) -> Accelerator:
    """An Accelerator for this machine: CPU processes (gloo) when no GPU, the precision `train.precision`
    resolves to here (selfsup/hardware.py), and intra-op threads sized to the usable cores; prints the
    choices and why."""
    check_trackers(cfg.train.trackers)
    has_cuda = torch.cuda.is_available()
    precision = choose_precision(cfg.train.precision, "cuda" if has_cuda else "cpu")
    parallelism = plan_parallelism(cfg.train.threads, cfg.data.num_workers, cfg.data.augment_on)
    torch.set_num_threads(parallelism.threads)
    allocator = keep_freed_memory()
    accelerator = Accelerator(
        cpu=not has_cuda,
        mixed_precision=precision.mode,
        gradient_accumulation_steps=cfg.train.accumulate_steps,
        log_with=list(cfg.train.trackers) or None,
        project_config=ProjectConfiguration(project_dir=str(run_dir) if run_dir else None),
        # the schedule is stepped by us per optimizer update, never per process
        step_scheduler_with_optimizer=False,
        dataloader_config=DataLoaderConfiguration(non_blocking=has_cuda),
    )
    if precision.warning:
        accelerator.print(f"[selfsup] warning: {precision.warning}")
    accelerator.print(f"[selfsup] {precision.describe()}; {parallelism.describe()}; {allocator}")
    if fsdp_requested_but_off(accelerator):
        accelerator.print("[selfsup] warning: the launch config asks for FSDP, which Accelerate enables on GPUs only; "
                          f"these {accelerator.distributed_type.value} processes train with DDP (full copies)")
    return accelerator


EXTRAS = ("tensorboard", "wandb")  # trackers with an extra of their own in pyproject.toml: selfsup[tensorboard]


def check_trackers(trackers: list[str]) -> None:
    """Every tracker of train.trackers installed, before any work: Accelerate would only warn and drop a missing
    one, and the run would finish without the logs it was asked for."""
    import difflib

    import accelerate.utils
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    for name in trackers:
        if name == "all":  # Accelerate's own: whichever are installed
            continue
        if name not in LOGGER_TYPE_TO_CLASS:
            close = difflib.get_close_matches(name, list(LOGGER_TYPE_TO_CLASS), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"train.trackers: {name!r} is not an Accelerate tracker ({', '.join(LOGGER_TYPE_TO_CLASS)}).{hint}")
        available = getattr(accelerate.utils, f"is_{name}_available", None)
        if available is not None and not available():
            install = f'pip install "selfsup[{name}]"' if name in EXTRAS else f"pip install {name.replace('_', '-')}"
            raise ConfigError(f"train.trackers names {name!r}, which is not installed here: {install}, "
                              f"or drop it from train.trackers.")


def make_loader(
    dataset: Dataset,
    data_cfg: DataConfig,
    *,
    seed: int,
    shuffle: bool = True,
    drop_last: bool = True,
    batch_size: int | None = None,
) -> DataLoader:
    """DataLoader whose order and augmentations are a function of (seed, epoch, index) only.

    The EpochSampler yields (epoch, index) keys, so a resumed run sees exactly the images and views
    an uninterrupted run would; the loader's own generator keeps the global RNG untouched.
    """
    workers = loader_workers(data_cfg)
    if isinstance(dataset, IterableDataset):  # a ShardStream: it splits the epoch across processes itself
        from selfsup.distributed import rank, world_size

        dataset.configure(batch_size or data_cfg.batch_size, rank(), world_size())
        return DataLoader(
            dataset, batch_size=batch_size or data_cfg.batch_size, num_workers=workers,
            pin_memory=torch.cuda.is_available(), persistent_workers=workers > 0,
            prefetch_factor=4 if workers > 0 else None, drop_last=drop_last,
            worker_init_fn=_ignore_stop_signals if workers > 0 else None,
        )
    return DataLoader(
        dataset,
        batch_size=batch_size or data_cfg.batch_size,
        sampler=EpochSampler(len(dataset), shuffle=shuffle, seed=seed),
        num_workers=workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
        drop_last=drop_last,
        generator=torch.Generator().manual_seed(seed),
        worker_init_fn=_ignore_stop_signals if workers > 0 else None,
    )


