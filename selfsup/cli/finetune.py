"""Fine-tune an encoder with a linear head, trained by selfsup.engine.fit (the loop pretraining uses).

    python tools/finetune.py --encoder runs/<run>/encoder --mode layer_decay --layer-decay 0.65
    python tools/finetune.py --encoder runs/<run>/encoder --mode discriminative --backbone-lr-scale 0.1
    python tools/finetune.py --encoder resnet18_small --image-size 28 --dataset fashion_mnist   # from scratch

Modes: frozen (backbone without gradients, out of the optimizer, kept in eval mode so its BatchNorm
statistics stay put; the head trains), full (one lr), discriminative (backbone lr = head lr x
--backbone-lr-scale), layer_decay (BEiT / MAE: layer i at lr x decay^(L + 1 - i) from timm's
grouping, head = L + 1). Training views: the `finetune` preset (crop + flip); testing: the eval
transform. Options: --label-smoothing, --mixup / --cutmix (timm), --drop-path, --ema-decay (timm
ModelEmaV3, evaluated alongside), --swa-start-epoch (SWA: torch's AveragedModel of the end-of-epoch weights
from that epoch on, at --swa-lr, constant or cyclic; BatchNorm statistics recomputed over the training data
before it is scored), --flood-level (flooding: train on |loss - b| + b). No weight decay on biases, norms,
position embeddings, class tokens. Writes result.json in the run directory (raw, EMA and SWA top-1 side by
side) and prints a final JSON line. Several runs of one encoder make a model soup: tools/soup.py.
"""

from __future__ import annotations

from selfsup.cli.common import build_parser, console, exit_on_user_error, print_config

TOOL = "finetune"
# The recipe without a --config: AdamW + warmup-cosine, weight decay 0.05 (MAE fine-tuning, shortened)
DEFAULTS = {
    "data": {"batch_size": 128},
    "optim": {"name": "adamw", "lr": 1e-3, "lr_scaling": "linear", "weight_decay": 0.05, "warmup_epochs": 1.0},
    "train": {"epochs": 20},
    "eval": {"max_test_samples": None},
}
FLAGS = [
    ("--mode", "finetune.mode", {"help": "frozen | full (default) | discriminative | layer_decay"}),
    ("--layer-decay", "optim.layer_decay", {"type": float, "help": "layer_decay mode: e.g. 0.65 (ViT-B) or 0.75"}),
    ("--backbone-lr-scale", "finetune.backbone_lr_scale", {"type": float, "help": "discriminative mode (default 0.1)"}),
    ("--label-smoothing", "finetune.label_smoothing", {"type": float}),
    ("--mixup", "finetune.mixup", {"type": float, "help": "Mixup alpha, e.g. 0.8"}),
    ("--cutmix", "finetune.cutmix", {"type": float, "help": "CutMix alpha, e.g. 1.0"}),
    ("--drop-path", "finetune.drop_path_rate", {"type": float, "help": "stochastic depth rate, e.g. 0.1"}),
    ("--ema-decay", "finetune.ema_decay", {"type": float, "help": "EMA of the weights, e.g. 0.999"}),
    ("--swa-start-epoch", "finetune.swa_start_epoch", {"type": int, "help": "SWA from this epoch (0-based), e.g. 3 of 4"}),
    ("--swa-lr", "finetune.swa_lr", {"type": float, "help": "SWA lr per 256 images (default optim.lr / 2)"}),
    ("--swa-schedule", "finetune.swa_schedule", {"help": "constant (default) | cyclic"}),
    ("--flood-level", "optim.flood_level", {"type": float, "help": "flooding level b, e.g. 0.05 (default off)"}),
    ("--optimizer", "optim.name", {"help": "adamw (default) | sgd | lars | lamb"}),
    ("--lr", "optim.lr", {"type": float, "help": "base lr of the head for a global batch of 256"}),
    ("--epochs", "train.epochs", {"type": int}),
]


@exit_on_user_error
def main(argv: list[str] | None = None) -> dict:
    args = build_parser(__doc__, FLAGS).parse_intermixed_args(argv)  # overrides may sit between flags
    from dataclasses import replace

    from accelerate.utils import set_seed
    from torch.utils.data import DataLoader

    from selfsup.averaging import SWASchedule
    from selfsup.config import ConfigError
    from selfsup.engine import fit, make_accelerator, make_loader
    from selfsup.evaluation import ClassifierEvaluator, final_evaluation
    from selfsup.finetune import Classifier, SupervisedTask, build_finetune_optimizer, with_drop_path
    from selfsup.hardware import loader_workers
    from selfsup.optim import scaled_lr
    from selfsup.transfer import finish, labelled_sets, prepare_run_dir, setup

    run = setup(args, TOOL, DEFAULTS, FLAGS, name_suffix=lambda cfg: f"_{cfg.finetune.mode}")
    if args.print_config:
        return print_config(run.cfg)
    cfg, ft = run.cfg, run.cfg.finetune
    if (ft.mixup or ft.cutmix) and cfg.data.batch_size % 2:
        raise ConfigError(f"Mixup/CutMix pair up each batch: data.batch_size must be even, got {cfg.data.batch_size}.")
    swa_on = ft.swa_start_epoch is not None
    if swa_on and (cfg.train.max_steps is not None or ft.swa_start_epoch >= cfg.train.epochs):
        raise ConfigError(f"finetune.swa_start_epoch={ft.swa_start_epoch} takes a snapshot at each epoch's end from then "
                          f"on: it must be below train.epochs={cfg.train.epochs}, with train.max_steps unset "
                          f"(now {cfg.train.max_steps}); e.g. --epochs 4 --swa-start-epoch 3.")
    accelerator = make_accelerator(cfg, run.run_dir)
    prepare_run_dir(run, TOOL, accelerator.is_main_process)
    set_seed(cfg.train.seed)
    bf16 = accelerator.mixed_precision == "bf16"
    train_set, test_set, num_classes = labelled_sets(run, augment=True)

    backbone = with_drop_path(run.encoder, ft.drop_path_rate)
    model = Classifier(backbone, num_classes, freeze_backbone=ft.mode == "frozen")
    task = SupervisedTask(model, num_classes, label_smoothing=ft.label_smoothing, mixup=ft.mixup, cutmix=ft.cutmix,
                          ema_decay=ft.ema_decay, swa_start_epoch=ft.swa_start_epoch)
    global_batch = cfg.data.batch_size * accelerator.num_processes * cfg.train.accumulate_steps  # as fit computes it
    optimizer = build_finetune_optimizer(model, cfg, scaled_lr(cfg.optim, global_batch))
    schedule, swa_lr = None, None
    if swa_on:
        swa_lr = scaled_lr(replace(cfg.optim, lr=ft.swa_lr or cfg.optim.lr / 2), global_batch)
        schedule = lambda base, steps_per_epoch: SWASchedule(  # noqa: E731
            base, steps_per_epoch, start_epoch=ft.swa_start_epoch, swa_lr=swa_lr, mode=ft.swa_schedule,
            anneal_epochs=ft.swa_anneal_epochs)
    # SWA's BatchNorm pass: the training images and views, in a fixed order, every one of them
    bn_batches = DataLoader(train_set, batch_size=cfg.data.batch_size, num_workers=loader_workers(cfg.data)) if swa_on else None
    evaluate = ClassifierEvaluator(test_set, batch_size=cfg.eval.batch_size, num_workers=loader_workers(cfg.data),
                                   device=accelerator.device, bf16=bf16, bn_batches=bn_batches)
    loader = make_loader(train_set, cfg.data, seed=cfg.train.seed)
    result = fit(task, loader, cfg, accelerator, run_dir=run.run_dir, evaluate=evaluate, optimizer=optimizer,
                 schedule=schedule)
    metrics = final_evaluation(result, task, evaluate, accelerator)
    if accelerator.is_main_process and (ft.ema_decay is not None or swa_on):
        side = "  ".join(f"{name} {metrics[key]:.2f}" for name, key in (("raw", "top1"), ("EMA", "ema_top1"),
                                                                         ("SWA", "swa_top1")) if key in metrics)
        accelerator.print(f"[selfsup] test top-1 (%): {side}")

    extra = {"mode": ft.mode, "layer_decay": cfg.optim.layer_decay,
             "backbone_lr_scale": ft.backbone_lr_scale if ft.mode == "discriminative" else None,
             "epochs": cfg.train.epochs, "steps": result.steps, "train_size": len(train_set), "test_size": len(test_set),
             "num_classes": num_classes, "ema_decay": ft.ema_decay, "swa_start_epoch": ft.swa_start_epoch,
             "swa_lr": swa_lr, "swa_schedule": ft.swa_schedule if swa_on else None, "flood_level": cfg.optim.flood_level}
    out = finish(run, TOOL, metrics, extra, args.output) if accelerator.is_main_process else metrics
    accelerator.end_training()
    return out


def cli() -> int:
    """`selfsup-finetune`."""
    return console(main)


if __name__ == "__main__":
    main()
