"""Weighted kNN top-1/top-5 of a frozen encoder (Wu et al. 2018: cosine, k=200, T=0.1 by default).

    python tools/knn.py --encoder runs/<run>/encoder --dataset fashion_mnist
    python tools/knn.py --encoder resnet18_small --dataset image_folder --root data/pets --image-size 64

Features of the train and test splits are computed once (eval transform, no augmentation); the vote
runs in blocks so a 1M x 1k feature bank fits in memory. Settings: eval.knn_k, eval.knn_temperature,
eval.batch_size (extraction); eval.pixel_baseline=true adds raw pixels scored the same way
(`--encoder pixels` scores pixels alone). Writes result.json in the run directory and prints a final JSON line.
"""

from __future__ import annotations

from selfsup.cli.common import build_parser, console, exit_on_user_error, print_config

TOOL = "knn"
DEFAULTS = {"eval": {"max_test_samples": None}}
FLAGS = [
    ("--k", "eval.knn_k", {"type": int, "help": "neighbours (eval.knn_k, default 200)"}),
    ("--temperature", "eval.knn_temperature", {"type": float, "help": "vote weight exp(sim / T) (default 0.1)"}),
]


@exit_on_user_error
def main(argv: list[str] | None = None) -> dict:
    args = build_parser(__doc__, FLAGS).parse_intermixed_args(argv)  # overrides may sit between flags
    from torch.utils.data import DataLoader

    from selfsup.engine import make_accelerator
    from selfsup.evaluation import PixelEncoder, extract_features, knn_evaluate
    from selfsup.hardware import loader_workers
    from selfsup.transfer import finish, labelled_sets, setup

    run = setup(args, TOOL, DEFAULTS, FLAGS)
    if args.print_config:
        return print_config(run.cfg)
    cfg = run.cfg
    accelerator = make_accelerator(cfg)
    train_set, test_set, num_classes = labelled_sets(run, augment=False)
    bf16 = accelerator.mixed_precision == "bf16"

    def score(encoder):
        (train_f, train_y), (test_f, test_y) = (
            extract_features(encoder, DataLoader(ds, batch_size=cfg.eval.batch_size, num_workers=loader_workers(cfg.data)),
                             accelerator.device, bf16=bf16)
            for ds in (train_set, test_set)
        )
        return knn_evaluate(train_f, train_y, test_f, test_y, k=cfg.eval.knn_k, temperature=cfg.eval.knn_temperature,
                            num_classes=num_classes, device=accelerator.device)

    metrics = score(run.encoder.to(accelerator.device))
    extra = {"k": cfg.eval.knn_k, "temperature": cfg.eval.knn_temperature, "train_size": len(train_set),
             "test_size": len(test_set), "num_classes": num_classes}
    if cfg.eval.pixel_baseline and not run.meta.get("pixels"):  # the same protocol on raw pixels
        extra.update({f"pixels_{k}": v for k, v in score(PixelEncoder()).items()})
    return finish(run, TOOL, metrics, extra, args.output) if accelerator.is_main_process else metrics


def cli() -> int:
    """`selfsup-knn`."""
    return console(main)


if __name__ == "__main__":
    main()
