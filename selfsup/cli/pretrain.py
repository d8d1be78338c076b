"""Pretrain an encoder: `accelerate launch pretrain.py --config configs/X.yaml [section.key=value ...]`.

Installed, the same is `selfsup-pretrain --config configs/X.yaml ...` (`accelerate launch -m selfsup.cli.pretrain`
under the launcher); `--print-config` prints the resolved config as YAML and exits.

Also runs as `python pretrain.py ...` (one process). On a machine without a GPU,
`accelerate launch --multi_gpu --num_processes 2 pretrain.py ...` starts 2 CPU processes (gloo).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML file with sections data, backbone, method, optim, train, eval")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    parser.add_argument("--debug", action="store_true", help="show the traceback of a failure (without it, a mistake "
                        "you can fix prints one line 'error: ...')")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=0.3 train.epochs=5")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    from selfsup.config import load_config

    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        from selfsup.cli.common import print_config

        return print_config(cfg)
    return run_pretraining(cfg)


def run_pretraining(cfg) -> dict[str, Any]:
    """Train, evaluate and export one resolved config; the summary (also summary.json in the run directory)."""
    from accelerate.utils import set_seed

    from selfsup.builders import build_batch_transform, build_pretraining, check_same_run, in_chans, run_dir_for
    from selfsup.config import save_config
    from selfsup.engine import NonFiniteLossError, TrainingInterrupted, fit, make_accelerator, make_loader
    from selfsup.export import save_encoder
    from selfsup.plots import plot_metrics
    from selfsup.report import environment, write_report, write_run_info

    started, clock = time.strftime("%Y-%m-%d %H:%M:%S %z"), time.perf_counter()
    run_dir = run_dir_for(cfg)
    check_same_run(cfg, run_dir)  # a rerun with other settings stops here, before config.yaml is rewritten
    accelerator = make_accelerator(cfg, run_dir)
    set_seed(cfg.train.seed)

    # build everything before any work, so a bad dataset path or backbone name fails fast
    method, train_set, info = build_pretraining(cfg)
    loader = make_loader(train_set, cfg.data, seed=cfg.train.seed)
    batch_transform = build_batch_transform(cfg, method, info)  # None unless data.augment_on=device
    monitor = evaluate = None
    if cfg.eval.every_epochs or cfg.eval.at_end:
        monitor = build_monitor(cfg, accelerator.device, bf16=accelerator.mixed_precision == "bf16")
        evaluate = with_reconstructions(monitor, method, cfg, train_set, info, run_dir)

    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    accelerator.wait_for_everyone()
    accelerator.print(f"[selfsup] run directory {run_dir}; world size {accelerator.num_processes}")

    fit_start = time.perf_counter()
    try:
        result = fit(method, loader, cfg, accelerator, run_dir=run_dir, evaluate=evaluate,
                     batch_transform=batch_transform)
    except (TrainingInterrupted, NonFiniteLossError):
        accelerator.end_training()
        raise
    fit_time = time.perf_counter() - fit_start

    summary = {"run_dir": str(run_dir), "steps": result.steps, "last_loss": result.last_loss}
    if result.eval_history:
        summary.update({k: v for k, v in result.eval_history[-1].items() if k.startswith("knn")})
    final_start = time.perf_counter()
    if monitor is not None and accelerator.is_main_process:
        summary.update(baselines(cfg, monitor, accelerator.device))
    final_time = time.perf_counter() - final_start
    if accelerator.is_main_process:
        trained = result.full_model if result.full_model is not None else method  # FSDP: the weights gathered from every process's shards
        save_encoder(
            trained.encoder,  # else prepare() wrapped this same module; its weights are the trained ones
            run_dir / "encoder",
            method=cfg.method.name,
            **({"variant": cfg.method.variant} if getattr(cfg.method, "variant", None) else {}),  # the probe's protocol
            run={"run_dir": str(run_dir), "steps": result.steps},
            data={"dataset": cfg.data.dataset, "image_size": cfg.data.image_size, "mean": list(info.mean),
                  "std": list(info.std), "in_chans": in_chans(cfg)},
        )
        plot_metrics(run_dir / "metrics.jsonl", run_dir)
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        from selfsup.hardware import loader_workers

        write_run_info(run_dir, {"started": started, "wall_time_s": time.perf_counter() - clock, "fit_time_s": fit_time,
                                 "final_eval_time_s": final_time,
                                 "environment": environment(accelerator, workers=loader_workers(cfg.data))})
        print(f"[selfsup] report: {write_report(run_dir)[1]}")
        print(json.dumps(summary))
        if (line := compare_line(summary)) is not None:
            print(line)
    accelerator.wait_for_everyone()  # all ranks leave together: gloo's teardown aborts otherwise, now and then
    accelerator.end_training()
    return summary


def build_monitor(cfg, device, bf16: bool = False):
    """kNN monitor on a labelled split (a KNNMonitor); None (with a note) when the data has no labels."""
    from selfsup.builders import build_labelled_pair, in_chans
    from selfsup.evaluation import KNNMonitor
    from selfsup.hardware import loader_workers

    from selfsup.data import is_streamed

    dataset = cfg.eval.dataset or cfg.data.dataset
    if cfg.eval.dataset is None and is_streamed(dataset, cfg.data.root):
        print(f"[selfsup] {dataset} data is streamed: no kNN monitor (set eval.dataset and eval.root to a labelled "
              "set read item by item, e.g. the image folder the shards were made from)")
        return None
    root = cfg.eval.root if cfg.eval.dataset else (cfg.eval.root or cfg.data.root)
    train_set, test_set = build_labelled_pair(
        dataset, root=root, image_size=cfg.data.image_size, in_chans=in_chans(cfg),
        train_split=cfg.eval.train_split, test_split=cfg.eval.test_split,
        max_train=cfg.eval.max_train_samples, max_test=cfg.eval.max_test_samples,
        download=cfg.data.download, seed=cfg.train.seed,
        num_samples=cfg.data.num_samples, num_classes=cfg.data.num_classes,
        holdout_fraction=cfg.eval.holdout_fraction, holdout_seed=cfg.eval.holdout_seed,
    )
    if getattr(train_set.base, "num_classes", None) is None:
        print(f"[selfsup] {dataset} has no labels here: no kNN monitor (set eval.dataset to a labelled set)")
        return None
    return KNNMonitor(train_set, test_set, k=cfg.eval.knn_k, temperature=cfg.eval.knn_temperature,
                      batch_size=cfg.eval.batch_size, num_workers=loader_workers(cfg.data), device=device,
                      bf16=bf16, pixel_baseline=cfg.eval.pixel_baseline)


def baselines(cfg, monitor, device) -> dict:
    """What the encoder's kNN figure stands beside on the same protocol: the same backbone at random
    init and raw pixels (eval.random_init_baseline / eval.pixel_baseline), and which is higher.
    With `linear_probe` in eval.final (and eval.at_end), also a linear probe of the encoder and of each
    baseline on the features the kNN just used (selfsup.evaluation.logistic_regression_probe)."""
    from accelerate.utils import set_seed

    from selfsup.builders import build_backbone
    from selfsup.evaluation import logistic_regression_probe

    probe = cfg.eval.at_end and "linear_probe" in cfg.eval.final

    def probed(features) -> dict:
        if not probe or features is None:
            return {}
        return {f"linear_probe_{k}": v for k, v in logistic_regression_probe(*features).items()}

    out: dict = probed(monitor.last_features)  # the engine's end-of-run evaluation: the final encoder's features
    if cfg.eval.random_init_baseline:
        set_seed(cfg.train.seed)  # the very initialisation the run started from
        scores = {**monitor(build_backbone(cfg).to(device)), **probed(monitor.last_features)}
        out.update({f"random_init_{k}": v for k, v in scores.items()})
    if cfg.eval.pixel_baseline:
        scores = {**monitor.pixels(), **probed(monitor.pixel_features)}
        out.update({f"pixels_{k}": v for k, v in scores.items()})
    return out


def compare_line(summary: dict) -> str | None:
    """One sentence with the encoder's kNN top-1 beside its baselines, saying which is higher."""
    if "knn_top1" not in summary:
        return None
    mine = summary["knn_top1"]
    parts = [f"encoder {mine:.1f} %"]
    verdicts = []
    for key, label in (("random_init_knn_top1", "same backbone at random init"), ("pixels_knn_top1", "raw pixels")):
        if key in summary:
            other = summary[key]
            parts.append(f"{label} {other:.1f} %")
            verdicts.append(f"{'above' if mine > other else 'BELOW' if mine < other else 'equal to'} {label} "
                            f"({mine - other:+.1f} points)")
    return "[selfsup] kNN top-1: " + ", ".join(parts) + (" -> the encoder is " + "; ".join(verdicts) if verdicts else "")


def with_reconstructions(monitor, method, cfg, train_set, info, run_dir):
    """The kNN monitor plus, for methods that reconstruct images (MAE, SimMIM), a PNG grid of fixed
    images at every evaluation: the monitor's test images, or the training images without augmentation."""
    from selfsup.builders import in_chans
    from selfsup.methods import Method
    from selfsup.plots import ReconstructionGrid
    from selfsup.sampling import ViewDataset
    from selfsup.transforms import build_eval_transform

    if type(method).reconstruct is Method.reconstruct or (monitor is None and not hasattr(train_set, "base")):
        return monitor  # nothing to reconstruct, or no image set to draw fixed images from (streamed data)
    if monitor is not None:
        source = monitor.loaders[1].dataset
    else:
        transform = build_eval_transform(image_size=cfg.data.image_size, mean=info.mean, std=info.std,
                                         in_chans=in_chans(cfg))
        source = ViewDataset(train_set.base, transform, seed=cfg.train.seed)
    grid = ReconstructionGrid.from_dataset(source, run_dir, info.mean, info.std)

    def evaluate(model):
        metrics = monitor(model) if monitor is not None else {}
        grid(model)
        return metrics

    return evaluate


def cli(argv: list[str] | None = None) -> int:
    """Command-line entry (`selfsup-pretrain`): a mistake the user can fix prints one line `error: ...` and exits 1
    (`--debug`: with its traceback); Ctrl-C exits 130, SIGTERM 143, each after saving a checkpoint."""
    parse_args(argv)  # --help and argument errors (status 2) before the heavy imports of main
    from selfsup.cli.common import exit_on_user_error

    exit_on_user_error(main)(argv)
    return 0


if __name__ == "__main__":
    sys.exit(cli())
