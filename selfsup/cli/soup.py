"""Model soups of several fine-tuning runs of one encoder (Wortsman et al. 2022): the uniform and the greedy soup.

    python tools/finetune.py --encoder runs/<run>/encoder --max-train 5000 --seed 0   # then seeds 1, 2 ...
    python tools/soup.py --runs runs/finetune_a runs/finetune_b runs/finetune_c --dataset fashion_mnist

The runs must share one architecture (different seeds or hyper-parameters of the same encoder). The greedy
soup is chosen on --holdout images of the training split that none of the runs trained on (so the runs must
have trained on a part of it: --max-train), never on the test set. Prints a table of every ingredient, the
uniform soup and the greedy soup (held-out and test top-1, which runs the greedy soup kept) and writes it as
JSON to --output. --weights ema / swa make soups of the runs' EMA / SWA weights. Logic: selfsup/soup.py.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from selfsup.cli.common import DEBUG_HELP, console, exit_on_user_error


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", required=True, help="tools/finetune.py run directories (2 or more)")
    parser.add_argument("--dataset", help="the runs' labelled dataset (default: theirs; another one is an error)")
    parser.add_argument("--weights", default="raw", help="raw (default) | ema | swa: which weights of each run")
    parser.add_argument("--holdout", type=int, default=2000, help="held-out training images for the greedy soup (default 2000)")
    parser.add_argument("--max-test", type=int, help="a fixed subset of the test split (default: the first run's eval.max_test_samples)")
    parser.add_argument("--seed", type=int, default=0, help="draws the held-out and test subsets (default 0)")
    parser.add_argument("--output", help="JSON table (default: RUNS_PARENT/soup_<weights>.json)")
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    return parser.parse_args(argv)


@exit_on_user_error
def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    from dataclasses import replace

    import torch
    from torch.utils.data import DataLoader

    from selfsup.averaging import recompute_batch_norm
    from selfsup.backbones import create_backbone
    from selfsup.config import ConfigError
    from selfsup.evaluation import evaluate_classifier
    from selfsup.finetune import Classifier
    from selfsup.sampling import ViewDataset
    from selfsup.soup import average_state_dicts, check_same_architecture, greedy_soup, has_batch_norm, load_ingredient
    from selfsup.splits import unused_holdout
    from selfsup.transfer import ToolRun, fit_input_size, labelled_sets

    if len(args.runs) < 2:
        raise ConfigError(f"--runs names {len(args.runs)} run; a soup needs 2 or more fine-tuning runs of one encoder.")
    ingredients = [load_ingredient(path, args.weights) for path in args.runs]
    names = [i.name for i in ingredients]
    if len(set(names)) < len(names):  # same folder name under different parents: use the paths
        for ingredient in ingredients:
            ingredient.name = str(ingredient.run_dir)
    check_same_architecture(ingredients)
    first = ingredients[0]
    for other in ingredients:
        if (other.cfg.data.dataset, other.cfg.data.split) != (first.cfg.data.dataset, first.cfg.data.split):
            raise ConfigError(f"runs {first.name} and {other.name} were fine-tuned on different data "
                              f"({first.cfg.data.dataset}/{first.cfg.data.split} vs {other.cfg.data.dataset}/{other.cfg.data.split}).")
    if args.dataset is not None and args.dataset != first.cfg.data.dataset:
        raise ConfigError(f"--dataset {args.dataset} but the runs were fine-tuned on {first.cfg.data.dataset}; "
                          f"pass --dataset {first.cfg.data.dataset} (a soup is scored on the data its runs learnt).")

    # --- data: each run's own training images (to leave out of the held-out part), one test set for all ------
    def tool_run(cfg) -> ToolRun:
        return ToolRun(cfg, None, {}, int(cfg.backbone.kwargs.get("in_chans", 3)), first.run_dir, "")

    max_test = args.max_test if args.max_test is not None else first.cfg.eval.max_test_samples
    common_cfg = replace(first.cfg, train=replace(first.cfg.train, seed=args.seed),
                         eval=replace(first.cfg.eval, max_test_samples=max_test))
    train_sets = [labelled_sets(tool_run(i.cfg), augment=False)[0] for i in ingredients]
    bn_set, test_set, _ = labelled_sets(tool_run(common_cfg), augment=True)  # views of the first run's training
    bn_set = ViewDataset(train_sets[0].base, bn_set.transform, seed=first.cfg.train.seed)
    holdout = unused_holdout(train_sets + [test_set], args.holdout, args.seed)
    holdout_set = ViewDataset(holdout, test_set.transform, seed=args.seed)
    batch = first.cfg.eval.batch_size
    loaders = {"holdout": DataLoader(holdout_set, batch_size=batch), "test": DataLoader(test_set, batch_size=batch)}
    bn_batches = DataLoader(bn_set, batch_size=first.cfg.data.batch_size)

    # --- one model; every state dict is loaded into it in turn --------------------------------------------
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backbone = create_backbone(first.cfg.backbone.name, **first.cfg.backbone.kwargs)
    fit_input_size(backbone, first.cfg.data.image_size, None)
    model = Classifier(backbone, int(first.state["head.fc.weight"].shape[0])).to(device)
    batch_norm = has_batch_norm(model)

    def scores(state, split: str, soup: bool) -> dict[str, float]:
        model.load_state_dict(state)
        if soup and batch_norm:  # the statistics of the averaged weights, not the average of statistics
            recompute_batch_norm(model, bn_batches, device)
        return evaluate_classifier(model, loaders[split], device, bf16=False)

    rows = []
    holdout_top1 = {}
    own_stats = args.weights != "swa"  # an SWA average is saved before its BatchNorm pass: recompute it too
    for ingredient in ingredients:
        held, test = (scores(ingredient.state, split, not own_stats) for split in ("holdout", "test"))
        holdout_top1[ingredient.name] = held["top1"]
        rows.append({"name": ingredient.name, "kind": "ingredient", "holdout_top1": held["top1"],
                     "test_top1": test["top1"], "test_top5": test["top5"]})
    states = {i.name: i.state for i in ingredients}
    uniform = average_state_dicts(list(states.values()))
    held, test = scores(uniform, "holdout", True), scores(uniform, "test", True)
    rows.append({"name": "uniform soup", "kind": "uniform_soup", "ingredients": list(states), "holdout_top1": held["top1"],
                 "test_top1": test["top1"], "test_top5": test["top5"]})
    greedy = greedy_soup(states, holdout_top1, lambda state: scores(state, "holdout", True)["top1"])
    test = scores(greedy.state, "test", len(greedy.kept) > 1)
    rows.append({"name": "greedy soup", "kind": "greedy_soup", "ingredients": greedy.kept, "holdout_top1": greedy.holdout_top1,
                 "test_top1": test["top1"], "test_top5": test["top5"], "trials": greedy.trials})

    result = {"tool": "soup", "dataset": first.cfg.data.dataset, "weights": args.weights, "runs": [str(i.run_dir) for i in ingredients],
              "greedy_kept": greedy.kept, "holdout_size": len(holdout_set), "holdout_from": f"{first.cfg.data.split} split, "
              "images no run trained on", "test_size": len(test_set), "batch_norm_recomputed": batch_norm, "rows": rows}
    output = Path(args.output) if args.output else first.run_dir.parent / f"soup_{args.weights}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2))
    width = max(len(row["name"]) for row in rows)
    print(f"{'':{width}}  held-out top-1  test top-1   ({len(holdout_set)} held-out training images, {len(test_set)} test)")
    for row in rows:
        note = f"  kept: {', '.join(row['ingredients'])}" if row["kind"] == "greedy_soup" else ""
        print(f"{row['name']:{width}}  {row['holdout_top1']:13.2f}  {row['test_top1']:10.2f}{note}")
    print(f"[selfsup] wrote {output}", flush=True)
    return result


def cli() -> int:
    """`selfsup-soup`."""
    return console(main)


if __name__ == "__main__":
    main()
