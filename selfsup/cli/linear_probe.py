"""Linear probe of a frozen encoder (MoCo / MAE protocols), trained by selfsup.engine.fit.

    python tools/linear_probe.py --encoder runs/<run>/encoder --dataset fashion_mnist
    python tools/linear_probe.py --encoder runs/<run>/encoder --batch-norm --optimizer lars optim.lr=0.1
    python tools/linear_probe.py --encoder resnet18_small --image-size 28 --dataset fashion_mnist   # random init

By default the features of the train split are computed once (eval mode, no augmentation) and cached,
and the classifier trains on them; --augment instead runs the frozen encoder (eval mode) on augmented
images (the `finetune` view preset) every epoch. --batch-norm puts MAE's BatchNorm without affine
parameters before the linear layer. Optimizer and schedule: the optim / train sections (SGD, LARS or
AdamW, warmup + cosine). Writes result.json in the run directory and prints a final JSON line.
"""

from __future__ import annotations

from selfsup.cli.common import build_parser, console, exit_on_user_error, print_config

TOOL = "linear_probe"
# The recipe without a --config: SGD + cosine on cached features, no weight decay (MoCo v1 / v2)
DEFAULTS = {
    "data": {"batch_size": 256},
    "optim": {"name": "sgd", "lr": 0.1, "lr_scaling": "linear", "weight_decay": 0.0, "momentum": 0.9,
              "warmup_epochs": 0.0},
    "train": {"epochs": 100, "log_every_steps": 50},
    "eval": {"max_test_samples": None},
}
FLAGS = [
    ("--augment", "probe.cache_features", {"action": "store_const", "const": False,
                                           "help": "augmented images every epoch instead of cached features"}),
    ("--batch-norm", "probe.batch_norm", {"action": "store_const", "const": True,
                                          "help": "BatchNorm without affine before the linear layer (MAE)"}),
    ("--optimizer", "optim.name", {"help": "sgd (default) | lars | adamw"}),
    ("--lr", "optim.lr", {"type": float, "help": "base lr for a global batch of 256"}),
    ("--epochs", "train.epochs", {"type": int}),
]


def _variant(cfg) -> str:
    return ("" if cfg.probe.cache_features else "_augment") + ("_bn" if cfg.probe.batch_norm else "")


@exit_on_user_error
def main(argv: list[str] | None = None) -> dict:
    args = build_parser(__doc__, FLAGS).parse_intermixed_args(argv)  # overrides may sit between flags
    from accelerate.utils import set_seed
    from torch.utils.data import DataLoader

    from selfsup.engine import fit, make_accelerator, make_loader
    from selfsup.evaluation import ClassifierEvaluator, extract_features, final_evaluation, linear_probe
    from selfsup.finetune import Classifier, SupervisedTask
    from selfsup.hardware import loader_workers
    from selfsup.transfer import finish, labelled_sets, prepare_run_dir, setup

    run = setup(args, TOOL, DEFAULTS, FLAGS, name_suffix=_variant)
    if args.print_config:
        return print_config(run.cfg)
    cfg = run.cfg
    accelerator = make_accelerator(cfg, run.run_dir)
    prepare_run_dir(run, TOOL, accelerator.is_main_process)
    set_seed(cfg.train.seed)
    bf16 = accelerator.mixed_precision == "bf16"
    train_set, test_set, num_classes = labelled_sets(run, augment=not cfg.probe.cache_features)

    if cfg.probe.cache_features:
        encoder = run.encoder.to(accelerator.device)
        (train_f, train_y), (test_f, test_y) = (
            extract_features(encoder, DataLoader(ds, batch_size=cfg.eval.batch_size, num_workers=loader_workers(cfg.data)),
                             accelerator.device, bf16=bf16)
            for ds in (train_set, test_set)
        )
        metrics = linear_probe(train_f, train_y, test_f, test_y, cfg, accelerator, run_dir=run.run_dir,
                               num_classes=num_classes)
    else:  # the frozen backbone stays in eval mode (BN statistics untouched); only the head trains
        model = Classifier(run.encoder, num_classes, freeze_backbone=True, head_batch_norm=cfg.probe.batch_norm)
        task = SupervisedTask(model, num_classes)
        evaluate = ClassifierEvaluator(test_set, batch_size=cfg.eval.batch_size, num_workers=loader_workers(cfg.data),
                                       device=accelerator.device, bf16=bf16)
        loader = make_loader(train_set, cfg.data, seed=cfg.train.seed)
        result = fit(task, loader, cfg, accelerator, run_dir=run.run_dir, evaluate=evaluate)
        metrics = final_evaluation(result, task, evaluate, accelerator)

    extra = {"cache_features": cfg.probe.cache_features, "batch_norm": cfg.probe.batch_norm, "optimizer": cfg.optim.name,
             "epochs": cfg.train.epochs, "train_size": len(train_set), "test_size": len(test_set), "num_classes": num_classes}
    out = finish(run, TOOL, metrics, extra, args.output) if accelerator.is_main_process else metrics
    accelerator.end_training()
    return out


def cli() -> int:
    """`selfsup-linear-probe`."""
    return console(main)


if __name__ == "__main__":
    main()
