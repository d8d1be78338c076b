"""Linear probe of a frozen encoder under its method family's protocol, trained by selfsup.engine.fit.

    python tools/linear_probe.py --encoder runs/<run>/encoder --dataset fashion_mnist
    python tools/linear_probe.py --encoder runs/<run>/encoder --protocol mae        # another family's protocol
    python tools/linear_probe.py --encoder resnet18_small --image-size 28 --dataset fashion_mnist --protocol moco

The protocol (optimizer, lr, schedule, epochs, BN before the layer, head init) is the released code's of the
method that trained the encoder (selfsup/probe_protocols.py; docs/recipes.md): moco (MoCo v1/v2: SGD lr 30,
x0.1 at epochs 60/80, un-normalised features), moco_v3 (SGD 0.1, cosine; ViTs 3), mae (BN without affine,
LARS 0.1, warmup 10; also SimMIM's), simclr (Nesterov 0.1, cosine, zero-initialised head). An encoder without
a method (random init, pixels) gets moco_v3's: pass --protocol to compare it with an encoder under the same
protocol. --config, flags and overrides still win; the run prints the protocol, its source and what it changed.
By default the features of the train split are computed once (eval mode, no augmentation) and cached, and the
classifier trains on them; --augment instead runs the frozen encoder (eval mode) on augmented images (the
`finetune` view preset) every epoch. Writes result.json in the run directory and prints a final JSON line.
"""

from __future__ import annotations

import sys

from selfsup.cli.common import build_parser, console, exit_on_user_error, print_config
from selfsup.probe_protocols import FALLBACK, PROTOCOLS, changed_keys, protocol_for

TOOL = "linear_probe"
DEFAULTS = PROTOCOLS[FALLBACK].recipe()  # the recipe of an encoder without a recorded method
FLAGS = [
    ("--augment", "probe.cache_features", {"action": "store_const", "const": False,
                                           "help": "augmented images every epoch instead of cached features"}),
    ("--batch-norm", "probe.batch_norm", {"action": "store_const", "const": True,
                                          "help": "BatchNorm without affine before the linear layer (MAE)"}),
    ("--protocol", "probe.protocol", {"choices": list(PROTOCOLS),
                                      "help": "whose linear probe (default: the family of the encoder's method)"}),
    ("--optimizer", "optim.name", {"help": "sgd | nesterov | lars | adamw (default: the protocol's)"}),
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

    chosen = {}

    def recipe(meta, first_cfg, encoder):
        vit = encoder is not None and getattr(encoder, "patch_embed", None) is not None
        chosen["protocol"], chosen["why"] = protocol_for(meta, first_cfg.probe.protocol, vit)
        return chosen["protocol"].recipe()

    run = setup(args, TOOL, recipe, FLAGS, name_suffix=lambda cfg: f"_{chosen['protocol'].name}{_variant(cfg)}")
    cfg = run.cfg
    protocol = chosen["protocol"]
    changed = changed_keys(protocol, cfg)
    print(f"[selfsup] linear probe protocol {protocol.name} ({chosen['why']}): {protocol.label}; source: {protocol.source}"
          + (f"; changed by this run: {', '.join(changed)}" if changed else ""), file=sys.stderr, flush=True)
    if args.print_config:
        return print_config(cfg)
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
        model = Classifier(run.encoder, num_classes, freeze_backbone=True, head_batch_norm=cfg.probe.batch_norm,
                           head_zero_init=cfg.probe.zero_init)
        task = SupervisedTask(model, num_classes)
        evaluate = ClassifierEvaluator(test_set, batch_size=cfg.eval.batch_size, num_workers=loader_workers(cfg.data),
                                       device=accelerator.device, bf16=bf16)
        loader = make_loader(train_set, cfg.data, seed=cfg.train.seed)
        result = fit(task, loader, cfg, accelerator, run_dir=run.run_dir, evaluate=evaluate)
        metrics = final_evaluation(result, task, evaluate, accelerator)

    extra = {"protocol": protocol.name, "protocol_source": protocol.source, "protocol_changed": changed,
             "cache_features": cfg.probe.cache_features, "batch_norm": cfg.probe.batch_norm, "optimizer": cfg.optim.name,
             "epochs": cfg.train.epochs, "train_size": len(train_set), "test_size": len(test_set), "num_classes": num_classes}
    out = finish(run, TOOL, metrics, extra, args.output) if accelerator.is_main_process else metrics
    accelerator.end_training()
    return out


def cli() -> int:
    """`selfsup-linear-probe`."""
    return console(main)


if __name__ == "__main__":
    main()
