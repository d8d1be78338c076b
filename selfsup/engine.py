"""The one training loop, on Accelerate: pretraining, linear probing and fine-tuning all run here.

Read `fit` top to bottom: prepare, resume, then per step forward -> finite check -> backward -> clip ->
optimizer step -> schedule -> `after_step` -> log -> checkpoint; per epoch the optional evaluation.
What stops a run cleanly (a NaN/Inf loss, SIGTERM/SIGINT) is in guards.py. Everything device- or process-specific (placement, mixed precision, DDP, gathers of
metrics, who writes files) is decided here and nowhere else.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from accelerate import Accelerator
from accelerate.data_loader import prepare_data_loader
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset
from tqdm.auto import tqdm

from selfsup.checkpoints import (
    load_resume_checkpoint,
    save_checkpoint,
)
from selfsup.config import Config, ConfigError, DataConfig
from selfsup.data import _mix_seed
from selfsup.guards import (  # noqa: F401  (NonFiniteLossError is part of the engine's API)
    NonFiniteLossError, _all_finite, _ignore_stop_signals, _NonFiniteWatch, _SignalFlag,
)
from selfsup.hardware import choose_precision, loader_workers, plan_parallelism
from selfsup.losses import flood
from selfsup.optim import build_optimizer, build_scheduler, scaled_lr, set_weight_decay
from selfsup.sampling import EpochSampler
from selfsup.sharding import fsdp_requested_but_off, gather_full_model, is_sharded, unsharded_copy


class TrainingInterrupted(RuntimeError):
    """SIGTERM/SIGINT arrived; a checkpoint of the last completed step was written first."""

    def __init__(self, signal_name: str, checkpoint: Path):
        super().__init__(f"{signal_name} received: saved {checkpoint}; the same command with train.resume=auto continues.")
        self.checkpoint = checkpoint
        self.signal_name = signal_name


@dataclass
class FitResult:
    steps: int
    epochs_completed: int
    last_loss: float | None
    skipped_nonfinite: int = 0
    eval_history: list[dict[str, Any]] = field(default_factory=list)
    full_model: nn.Module | None = None  # FSDP: the trained weights gathered on the main process (what export saves)


def make_accelerator(cfg: Config, run_dir: str | Path | None = None) -> Accelerator:
    """An Accelerator for this machine: CPU processes (gloo) when no GPU, the precision `train.precision`
    resolves to here (selfsup/hardware.py), and intra-op threads sized to the usable cores; prints the
    choices and why."""
    check_trackers(cfg.train.trackers)
    has_cuda = torch.cuda.is_available()
    precision = choose_precision(cfg.train.precision, "cuda" if has_cuda else "cpu")
    parallelism = plan_parallelism(cfg.train.threads, cfg.data.num_workers, cfg.data.augment_on)
    torch.set_num_threads(parallelism.threads)
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
    accelerator.print(f"[selfsup] {precision.describe()}; {parallelism.describe()}")
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


def fit(
    model: nn.Module,
    loader: DataLoader,
    cfg: Config,
    accelerator: Accelerator,
    *,
    run_dir: str | Path,
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    batch_transform: Callable[..., Any] | None = None,
    schedule: Callable[[Any, int], Any] | None = None,
) -> FitResult:
    """Train `model` (forward(batch) -> StepOutput) on `loader` as `cfg.train` says; resumable.

    `batch_transform(batch, generator=...)`, if given, makes each batch's views on the device before the
    forward (data.augment_on=device), drawing from a generator seeded by (seed, epoch, batch, process).
    `schedule(scheduler, steps_per_epoch)`, if given, returns the scheduler to step instead of the warmup-cosine
    one (e.g. SWA's learning rate after its start epoch); it must set the lr from the update count alone, so a
    resumed run gets the same rates. `model.after_epoch(epoch)`, if the model has it, runs at each epoch's end.
    """
    tcfg = cfg.train
    run_dir = Path(run_dir)
    ckpt_root = run_dir / "checkpoints"
    is_main = accelerator.is_main_process
    if is_main:  # a caller (e.g. a notebook) need not create it: metrics and checkpoints go in it
        run_dir.mkdir(parents=True, exist_ok=True)
    sampler = loader.sampler if isinstance(loader.sampler, EpochSampler) else None
    dataset = getattr(loader, "dataset", None)  # for the broken-image count

    # --- effective batch and learning rate (printed: the first thing to check in any run) -----
    world = accelerator.num_processes
    accumulate = tcfg.accumulate_steps
    batch_size = loader.batch_size
    global_batch = batch_size * world * accumulate
    lr = scaled_lr(cfg.optim, global_batch)
    if optimizer is None:
        optimizer = build_optimizer(model, cfg.optim, lr)
    if tcfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if tcfg.compile:
        model.compile()  # in place: parameter names (and exported keys) stay the same

    shadow = unsharded_copy(model, accelerator)  # FSDP: what evaluation and export gather the full weights into
    stream = dataset if isinstance(dataset, IterableDataset) else None  # positioned by set_position, not a sampler
    if stream is None:
        model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    else:  # already split per process: Accelerate only places batches (no sharding, no dispatch)
        model, optimizer = accelerator.prepare(model, optimizer)
        loader = prepare_data_loader(loader, accelerator.device, num_processes=1, process_index=0, put_on_device=True,
                                     dispatch_batches=False, non_blocking=torch.cuda.is_available())
    batches_per_epoch = len(loader)
    steps_per_epoch = math.ceil(batches_per_epoch / accumulate)
    if batches_per_epoch == 0:
        # batch_size as read before prepare(): Accelerate's loader carries a batch sampler and batch_size None
        size = f" ({len(dataset)} images)" if dataset is not None else ""
        raise ValueError(
            f"The dataset{size} has fewer images than one global batch ({global_batch} = data.batch_size "
            f"{batch_size} x {world} processes x {accumulate} accumulation steps); "
            "lower data.batch_size or use more data."
        )
    total_steps = tcfg.max_steps or tcfg.epochs * steps_per_epoch
    warmup_steps = round(cfg.optim.warmup_epochs * steps_per_epoch)
    scheduler = build_scheduler(optimizer, cfg.optim, total_steps, warmup_steps, steps_per_epoch)
    if schedule is not None:
        scheduler = schedule(scheduler, steps_per_epoch)
    # Accumulation enlarges the optimizer's batch only: negatives and BN statistics come from each micro-batch.
    objective_batch = batch_size * world
    accelerator.print(
        f"[selfsup] processes={world} per-process batch={batch_size} accumulate={accumulate} "
        f"-> global batch {global_batch} (optimizer), {objective_batch} per objective (negatives, BN); {cfg.optim.name} lr = {cfg.optim.lr:g} x scaling '{cfg.optim.lr_scaling}' = {lr:.6g}; "
        f"{steps_per_epoch} steps/epoch, {total_steps} steps, warmup {warmup_steps}, {_schedule_text(cfg.optim)}; "
        f"device={accelerator.device} precision={accelerator.mixed_precision}"
    )

    # --- resume --------------------------------------------------------------------------------
    state: dict[str, Any] = {"step": 0, "epoch": 0, "batches_in_epoch": 0, "last_loss": None, "skipped_nonfinite": 0}
    resume_from, saved_state = load_resume_checkpoint(accelerator, tcfg.resume, ckpt_root)  # newest that loads
    if resume_from is not None:
        state.update(saved_state)
        accelerator.print(f"[selfsup] resumed from {resume_from} at step {state['step']}")
    if tcfg.trackers:
        accelerator.init_trackers(run_dir.name, config=_flat_config(cfg))

    step, epoch, skip = state["step"], state["epoch"], state["batches_in_epoch"]
    unwrapped = accelerator.unwrap_model(model)
    after_epoch = getattr(unwrapped, "after_epoch", None)
    if skip >= batches_per_epoch:  # saved at the epoch's last step, before its end-of-epoch work: do that now
        epoch, skip = epoch + 1, 0
        if after_epoch is not None:
            after_epoch(epoch)
    scheduler.step_update(step + 1)  # the lr of the next update
    set_weight_decay(optimizer, cfg.optim, step, total_steps)  # and its weight decay (optim.weight_decay_end)
    if hasattr(unwrapped, "on_fit_start"):
        unwrapped.on_fit_start(step, total_steps, steps_per_epoch)
    metrics_file = run_dir / "metrics.jsonl"
    result = FitResult(step, epoch, state["last_loss"], state["skipped_nonfinite"])
    last_saved = step if resume_from is not None else -1

    position = (epoch, skip)
    generator = torch.Generator(device=accelerator.device) if batch_transform is not None else None
    watch = _NonFiniteWatch(accelerator, result, ckpt_root)
    model.train()
    signals = _SignalFlag().install()
    progress = tqdm(total=total_steps, initial=step, disable=not is_main, dynamic_ncols=True, desc="train")
    window_images, window_start = 0, time.perf_counter()
    try:
        while step < total_steps and (tcfg.max_steps or epoch < tcfg.epochs):
            # Accelerate's loaders re-apply their own epoch counter to the sampler at every iter();
            # set theirs too, so a resumed run (and its skip-loader) sees this epoch's order.
            if hasattr(loader, "set_epoch"):
                loader.set_epoch(epoch)
            if sampler is not None:
                sampler.set_epoch(epoch)
            if stream is not None:  # a stream starts at the batch itself: nothing is read twice
                stream.set_position(epoch, skip)
                batches = loader
            else:
                batches = accelerator.skip_first_batches(loader, skip) if skip else loader
            batch_index = skip
            for batch in batches:
                batch_index += 1
                if batch_transform is not None:  # the same views whatever the resume point
                    generator.manual_seed(_mix_seed(tcfg.seed, epoch, batch_index, accelerator.process_index))
                    batch = batch_transform(batch, generator=generator)
                with accelerator.accumulate(model):
                    out = model(batch)
                    if tcfg.skip_nonfinite:  # skipping is decided now: one host sync per step
                        if not _all_finite(out.loss, accelerator):
                            result.skipped_nonfinite += 1
                            optimizer.zero_grad(set_to_none=True)
                            continue
                    else:
                        watch.record(out.loss, step + 1)
                    accelerator.backward(flood(out.loss, cfg.optim.flood_level))  # logged: the loss itself
                    if accelerator.sync_gradients and tcfg.clip_grad:
                        accelerator.clip_grad_norm_(model.parameters(), tcfg.clip_grad)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                window_images += _batch_size(batch) * world
                if not accelerator.sync_gradients:
                    continue

                step += 1
                position = (epoch, batch_index)  # where a checkpoint taken now resumes
                scheduler.step_update(step + 1)
                set_weight_decay(optimizer, cfg.optim, step, total_steps)
                unwrapped.after_step(step / total_steps)
                progress.update(1)

                if step % tcfg.log_every_steps == 0 or step == total_steps:
                    watch.check()
                    loss = accelerator.reduce(out.loss.detach().float(), reduction="mean").item()
                    result.last_loss = loss
                    elapsed = time.perf_counter() - window_start
                    record = {
                        "step": step,
                        "epoch": epoch + batch_index / batches_per_epoch,
                        "loss": loss,
                        "lr": max(group["lr"] for group in optimizer.param_groups),
                        **({"weight_decay": max(group["weight_decay"] for group in optimizer.param_groups)}
                           if cfg.optim.weight_decay_end is not None else {}),
                        "images_per_sec": window_images / max(elapsed, 1e-9),
                        **{k: _to_float(v) for k, v in out.metrics.items()},
                    }
                    if result.skipped_nonfinite:
                        record["skipped_nonfinite"] = result.skipped_nonfinite
                    if getattr(dataset, "broken_images", 0):
                        record["broken_images"] = dataset.broken_images
                    window_images, window_start = 0, time.perf_counter()
                    progress.set_postfix(loss=f"{loss:.4f}", lr=f"{record['lr']:.3g}", img_s=f"{record['images_per_sec']:.0f}")
                    if is_main:
                        _append_jsonl(metrics_file, record)
                    if tcfg.trackers:
                        accelerator.log(record, step=step)

                if tcfg.checkpoint_every_steps and step % tcfg.checkpoint_every_steps == 0:
                    watch.check()  # never save weights a non-finite step has touched
                    _checkpoint(accelerator, ckpt_root, step, position, result, tcfg.keep_checkpoints)
                    last_saved = step
                if _any_process(signals.received is not None, accelerator):
                    watch.check()
                    saved = _checkpoint(accelerator, ckpt_root, step, position, result, tcfg.keep_checkpoints)
                    raise TrainingInterrupted(signals.received or "a signal on another process", saved)
                if step >= total_steps:
                    break

            skip = 0
            if batch_index >= batches_per_epoch:
                epoch += 1
                position = (epoch, 0)  # a checkpoint taken from here on resumes after this end-of-epoch work
                if after_epoch is not None:
                    after_epoch(epoch)
                if evaluate is not None and cfg.eval.every_epochs and epoch % cfg.eval.every_epochs == 0 and step < total_steps:
                    watch.check()
                    result.eval_history.append(_run_evaluation(evaluate, model, shadow, accelerator, step, epoch, metrics_file))
                    model.train()
            elif step >= total_steps:
                break
    finally:
        progress.close()
        signals.restore()
    watch.check()

    if step != last_saved:
        _checkpoint(accelerator, ckpt_root, step, position, result, tcfg.keep_checkpoints)
    if evaluate is not None and cfg.eval.at_end:
        result.eval_history.append(_run_evaluation(evaluate, model, shadow, accelerator, step, epoch, metrics_file))
    result.steps, result.epochs_completed = step, epoch
    if is_sharded(accelerator):  # every process takes part in the gather; the main one keeps the weights
        result.full_model = gather_full_model(accelerator, model, shadow)
    return result


# --------------------------------------------------------------------------------------------
# checkpoints: the loop's position; the format on disk is selfsup/checkpoints.py


def _checkpoint(accelerator, ckpt_root, step, position, result: FitResult, keep: int) -> Path:
    epoch, batches_in_epoch = position
    state = {"step": step, "epoch": epoch, "batches_in_epoch": batches_in_epoch,
             "last_loss": result.last_loss, "skipped_nonfinite": result.skipped_nonfinite}
    return save_checkpoint(accelerator, ckpt_root, state, keep)


# --------------------------------------------------------------------------------------------
# helpers


def _run_evaluation(evaluate, model, shadow, accelerator, step, epoch, metrics_file) -> dict[str, Any]:
    """Evaluation runs on the main process only (a kNN monitor is cheap); the others wait. Under FSDP all of them
    first gather the full weights into the main process's unsharded copy, which is evaluated on the device."""
    record: dict[str, Any] = {"step": step, "epoch": epoch}
    full = gather_full_model(accelerator, model, shadow)
    if accelerator.is_main_process:
        if full is shadow:
            full.to(accelerator.device)
        record.update(evaluate(full))
        if full is shadow:
            full.cpu()
        accelerator.print(f"[selfsup] eval at step {step}: " + json.dumps(record))
        _append_jsonl(metrics_file, record)
    accelerator.wait_for_everyone()
    return record


def _any_process(flag: bool, accelerator: Accelerator) -> bool:
    """A stop request seen on any rank stops all of them at the same step."""
    if accelerator.num_processes == 1:
        return flag
    return accelerator.reduce(torch.tensor(float(flag), device=accelerator.device), reduction="sum").item() > 0


def _batch_size(batch: Any) -> int:
    first = batch[0] if isinstance(batch, (list, tuple)) else batch
    while isinstance(first, (list, tuple)):
        first = first[0]
    return int(first.shape[0])


def _to_float(value: Any) -> Any:
    return value.detach().float().item() if isinstance(value, torch.Tensor) else value


def _append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def _schedule_text(optim_cfg) -> str:
    if optim_cfg.schedule == "step":
        return "lr x 0.1 at epochs " + ", ".join(f"{m:g}" for m in optim_cfg.lr_milestones)
    return "cosine"


def _flat_config(cfg: Config) -> dict[str, Any]:
    from selfsup.config import to_dict

    flat: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        else:
            flat[prefix] = node if isinstance(node, (int, float, str, bool)) else str(node)

    walk("", to_dict(cfg))
    return flat
