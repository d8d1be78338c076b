"""The one training loop, on Accelerate: pretraining, linear probing and fine-tuning all run here.

Read `fit` top to bottom: `_prepare`, `_resume`, then per step `_train_step` (forward -> finite check -> backward
-> clip -> optimizer step) -> schedule -> `after_step` -> `_log` -> `_checkpoint`; per epoch the optional evaluation.
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
from accelerate import Accelerator, DistributedType
from accelerate.data_loader import prepare_data_loader
from torch import nn
from torch.utils.data import DataLoader, IterableDataset
from tqdm.auto import tqdm

from selfsup.checkpoints import load_resume_checkpoint, save_checkpoint
from selfsup.config import Config, ConfigError
from selfsup.data import _mix_seed
from selfsup.guards import (  # noqa: F401  (NonFiniteLossError is part of the engine's API)
    NonFiniteLossError, _all_finite, _NonFiniteWatch, _SignalFlag,
)
from selfsup.launch import check_trackers, make_accelerator, make_loader  # noqa: F401  (the engine's API)
from selfsup.losses import flood
from selfsup.optim import build_optimizer, build_scheduler, clip_grad_per_parameter_, scaled_lr, set_weight_decay
from selfsup.sampling import EpochSampler
from selfsup.sharding import gather_full_model, is_sharded, unsharded_copy


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


@dataclass
class _Run:
    """What `_prepare` decided for a run: the prepared objects and the step arithmetic."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    loader: DataLoader
    scheduler: Any
    shadow: nn.Module | None  # FSDP: the unsharded copy evaluation and export gather into
    sampler: EpochSampler | None
    stream: IterableDataset | None  # a streaming dataset, positioned by set_position instead of a sampler
    dataset: Any
    world: int
    batches_per_epoch: int
    steps_per_epoch: int
    total_steps: int


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
    if accelerator.is_main_process:  # a caller (e.g. a notebook) need not create it: metrics and checkpoints go in it
        run_dir.mkdir(parents=True, exist_ok=True)
    run = _prepare(model, loader, cfg, accelerator, optimizer, schedule)
    model, optimizer, loader = run.model, run.optimizer, run.loader
    step, epoch, skip, result, last_saved = _resume(run, cfg, accelerator, ckpt_root, run_dir.name)
    unwrapped = accelerator.unwrap_model(model)
    after_epoch = getattr(unwrapped, "after_epoch", None)
    if skip >= run.batches_per_epoch:  # saved at the epoch's last step, before its end-of-epoch work: do that now
        epoch, skip = epoch + 1, 0
        if after_epoch is not None:
            after_epoch(epoch)
    run.scheduler.step_update(step + 1)  # the lr of the next update
    set_weight_decay(optimizer, cfg.optim, step, run.total_steps)  # and its weight decay (optim.weight_decay_end)
    if hasattr(unwrapped, "on_fit_start"):
        unwrapped.on_fit_start(step, run.total_steps, run.steps_per_epoch)

    metrics_file = run_dir / "metrics.jsonl"
    position = (epoch, skip)  # where a checkpoint taken now resumes: (epoch, batches done in it)
    generator = torch.Generator(device=accelerator.device) if batch_transform is not None else None
    watch = _NonFiniteWatch(accelerator, result, ckpt_root)
    model.train()
    signals = _SignalFlag().install()
    progress = tqdm(total=run.total_steps, initial=step, disable=not accelerator.is_main_process,
                    dynamic_ncols=True, desc="train")
    window = _Window()
    try:
        while step < run.total_steps and (tcfg.max_steps or epoch < tcfg.epochs):
            batch_index = skip
            for batch in _epoch_batches(run, accelerator, epoch, skip):
                batch_index += 1
                if batch_transform is not None:  # the same views whatever the resume point
                    generator.manual_seed(_mix_seed(tcfg.seed, epoch, batch_index, accelerator.process_index))
                    batch = batch_transform(batch, generator=generator)
                out = _train_step(run, batch, cfg, accelerator, watch, result, step)
                if out is None:  # a non-finite loss skipped (train.skip_nonfinite)
                    continue
                window.images += _batch_size(batch) * run.world
                if not accelerator.sync_gradients:  # accumulating: no update yet
                    continue

                step += 1
                position = (epoch, batch_index)
                run.scheduler.step_update(step + 1)
                set_weight_decay(optimizer, cfg.optim, step, run.total_steps)
                unwrapped.after_step(step / run.total_steps)
                progress.update(1)
                if step % tcfg.log_every_steps == 0 or step == run.total_steps:
                    watch.check()
                    _log(run, cfg, accelerator, out, step, epoch + batch_index / run.batches_per_epoch, window, result,
                         progress, metrics_file)
                if tcfg.checkpoint_every_steps and step % tcfg.checkpoint_every_steps == 0:
                    watch.check()  # never save weights a non-finite step has touched
                    _checkpoint(accelerator, ckpt_root, step, position, result, tcfg.keep_checkpoints)
                    last_saved = step
                if _any_process(signals.received is not None, accelerator):
                    watch.check()
                    saved = _checkpoint(accelerator, ckpt_root, step, position, result, tcfg.keep_checkpoints)
                    raise TrainingInterrupted(signals.received or "a signal on another process", saved)
                if step >= run.total_steps:
                    break

            skip = 0
            if batch_index >= run.batches_per_epoch:  # the epoch ended: its end-of-epoch work
                epoch += 1
                position = (epoch, 0)  # a checkpoint taken from here on resumes after this end-of-epoch work
                if after_epoch is not None:
                    after_epoch(epoch)
                if evaluate is not None and cfg.eval.every_epochs and epoch % cfg.eval.every_epochs == 0 \
                        and step < run.total_steps:
                    watch.check()
                    result.eval_history.append(
                        _run_evaluation(evaluate, model, run.shadow, accelerator, step, epoch, metrics_file))
                    model.train()
            elif step >= run.total_steps:
                break
    finally:
        progress.close()
        signals.restore()
    watch.check()

    if step != last_saved:
        _checkpoint(accelerator, ckpt_root, step, position, result, tcfg.keep_checkpoints)
    if evaluate is not None and cfg.eval.at_end:
        result.eval_history.append(_run_evaluation(evaluate, model, run.shadow, accelerator, step, epoch, metrics_file))
    result.steps, result.epochs_completed = step, epoch
    if is_sharded(accelerator):  # every process takes part in the gather; the main one keeps the weights
        result.full_model = gather_full_model(accelerator, model, run.shadow)
    return result


# --------------------------------------------------------------------------------------------
# the pieces of fit: prepare, resume, one step, one log record


def _prepare(model, loader, cfg: Config, accelerator: Accelerator, optimizer, schedule) -> _Run:
    """Optimizer, Accelerate's prepare, the step arithmetic and the schedule; prints the effective batch and lr
    (the first thing to check in any run)."""
    tcfg = cfg.train
    dataset = getattr(loader, "dataset", None)  # for the broken-image count
    sampler = loader.sampler if isinstance(loader.sampler, EpochSampler) else None
    world = accelerator.num_processes
    accumulate = tcfg.accumulate_steps
    batch_size = loader.batch_size
    global_batch = batch_size * world * accumulate
    lr = scaled_lr(cfg.optim, global_batch)
    if tcfg.clip_grad and tcfg.clip_grad_mode == "per_parameter" and accelerator.distributed_type == DistributedType.FSDP:
        raise ConfigError("train.clip_grad_mode=per_parameter clips whole parameters, which FSDP shards: set "
                          "train.clip_grad_mode=norm (the norm of all gradients together).")
    if optimizer is None:
        optimizer = build_optimizer(model, cfg.optim, lr)
    if tcfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if tcfg.compile:
        model.compile()  # in place: parameter names (and exported keys) stay the same

    shadow = unsharded_copy(model, accelerator)  # FSDP: what evaluation and export gather the full weights into
    stream = dataset if isinstance(dataset, IterableDataset) else None
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
    return _Run(model, optimizer, loader, scheduler, shadow, sampler, stream, dataset, world,
                batches_per_epoch, steps_per_epoch, total_steps)


def _resume(run: _Run, cfg: Config, accelerator: Accelerator, ckpt_root: Path, run_name: str):
    """(step, epoch, batches done in the epoch, FitResult, last saved step) from the newest checkpoint that loads,
    or a fresh start; starts the trackers."""
    state: dict[str, Any] = {"step": 0, "epoch": 0, "batches_in_epoch": 0, "last_loss": None, "skipped_nonfinite": 0}
    resume_from, saved_state = load_resume_checkpoint(accelerator, cfg.train.resume, ckpt_root)
    if resume_from is not None:
        state.update(saved_state)
        accelerator.print(f"[selfsup] resumed from {resume_from} at step {state['step']}")
    if cfg.train.trackers:
        accelerator.init_trackers(run_name, config=_flat_config(cfg))
    step = state["step"]
    result = FitResult(step, state["epoch"], state["last_loss"], state["skipped_nonfinite"])
    last_saved = step if resume_from is not None else -1
    return step, state["epoch"], state["batches_in_epoch"], result, last_saved


def _epoch_batches(run: _Run, accelerator: Accelerator, epoch: int, skip: int):
    """This epoch's batches from batch `skip` on, in the order a run without restarts sees them."""
    # Accelerate's loaders re-apply their own epoch counter to the sampler at every iter();
    # set theirs too, so a resumed run (and its skip-loader) sees this epoch's order.
    if hasattr(run.loader, "set_epoch"):
        run.loader.set_epoch(epoch)
    if run.sampler is not None:
        run.sampler.set_epoch(epoch)
    if run.stream is not None:  # a stream starts at the batch itself: nothing is read twice
        run.stream.set_position(epoch, skip)
        return run.loader
    return accelerator.skip_first_batches(run.loader, skip) if skip else run.loader


def _train_step(run: _Run, batch, cfg: Config, accelerator: Accelerator, watch, result: FitResult, step: int):
    """forward -> finite check -> backward (flooded) -> clip -> optimizer step, under Accelerate's accumulation;
    the StepOutput, or None when train.skip_nonfinite dropped this batch."""
    tcfg = cfg.train
    with accelerator.accumulate(run.model):
        out = run.model(batch)
        if tcfg.skip_nonfinite:  # skipping is decided now: one host sync per step
            if not _all_finite(out.loss, accelerator):
                result.skipped_nonfinite += 1
                run.optimizer.zero_grad(set_to_none=True)
                return None
        else:
            watch.record(out.loss, step + 1)
        accelerator.backward(flood(out.loss, cfg.optim.flood_level))  # logged: the loss itself
        if accelerator.sync_gradients and tcfg.clip_grad:
            if tcfg.clip_grad_mode == "per_parameter":
                accelerator.unscale_gradients()  # fp16: the loss scale off first, as clip_grad_norm_ does
                clip_grad_per_parameter_(run.model.parameters(), tcfg.clip_grad)
            else:
                accelerator.clip_grad_norm_(run.model.parameters(), tcfg.clip_grad)
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
    return out


@dataclass
class _Window:
    """Images seen since the last log record, for its images/s."""

    images: int = 0
    start: float = field(default_factory=time.perf_counter)


def _log(run: _Run, cfg: Config, accelerator: Accelerator, out, step: int, epoch: float, window: _Window,
         result: FitResult, progress, metrics_file: Path) -> None:
    """One metrics record: the loss averaged over processes, lr, images/s and the method's own metrics."""
    loss = accelerator.reduce(out.loss.detach().float(), reduction="mean").item()
    result.last_loss = loss
    groups = run.optimizer.param_groups
    record = {
        "step": step,
        "epoch": epoch,
        "loss": loss,
        "lr": max(group["lr"] for group in groups),
        **({"weight_decay": max(group["weight_decay"] for group in groups)}
           if cfg.optim.weight_decay_end is not None else {}),
        "images_per_sec": window.images / max(time.perf_counter() - window.start, 1e-9),
        **{k: _to_float(v) for k, v in out.metrics.items()},
    }
    if result.skipped_nonfinite:
        record["skipped_nonfinite"] = result.skipped_nonfinite
    if getattr(run.dataset, "broken_images", 0):
        record["broken_images"] = run.dataset.broken_images
    window.images, window.start = 0, time.perf_counter()
    progress.set_postfix(loss=f"{loss:.4f}", lr=f"{record['lr']:.3g}", img_s=f"{record['images_per_sec']:.0f}")
    if accelerator.is_main_process:
        _append_jsonl(metrics_file, record)
    if cfg.train.trackers:
        accelerator.log(record, step=step)


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
