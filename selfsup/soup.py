"""Model soups (Wortsman et al. 2022): the weights of several runs fine-tuned from one pretrained encoder,
averaged into one model of the same cost.

The uniform soup is the mean of every ingredient's state dict. The greedy soup is the paper's Recipe 1: the
ingredients sorted by held-out accuracy, the best one first, each next one kept only if the soup with it
scores higher on the held-out set than the soup without it (strictly higher, as in the authors' main.py; the
paper's Recipe 1 writes >=). The held-out images come from the training split, never from the test set, and
from images none of the runs trained on (`unused_holdout`). A soup of networks with BatchNorm gets its running
statistics recomputed over training data (averaged statistics are not those of the averaged weights).
No library offers soups over a run directory, so this is written here; the arithmetic is plain torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file
from torch import nn

from selfsup.checkpoints import list_checkpoints
from selfsup.config import Config, ConfigError, load_config

__all__ = ["Ingredient", "WEIGHTS", "load_ingredient", "check_same_architecture", "average_state_dicts",
           "greedy_soup", "GreedySoup"]

# which weights of a fine-tuning run go in: the trained model, its EMA (--ema-decay), its SWA average (--swa-start-epoch)
WEIGHTS = {"raw": "model.", "ema": "ema.module.", "swa": "swa.module."}
_FLAGS = {"ema": "--ema-decay", "swa": "--swa-start-epoch"}


@dataclass
class Ingredient:
    name: str
    run_dir: Path
    cfg: Config
    state: dict[str, torch.Tensor]  # the Classifier's state dict (backbone.*, head.*)

    @property
    def architecture(self) -> dict:
        return {"backbone": self.cfg.backbone.name, "kwargs": dict(self.cfg.backbone.kwargs),
                "image_size": self.cfg.data.image_size}


def load_ingredient(run_dir: str | Path, weights: str = "raw") -> Ingredient:
    """The fine-tuned classifier of a tools/finetune.py run directory (its last checkpoint) and the run's config."""
    run_dir = Path(run_dir)
    if weights not in WEIGHTS:
        raise ConfigError(f"--weights {weights!r} is not one of {', '.join(WEIGHTS)}.")
    record, config = run_dir / "run.json", run_dir / "config.yaml"
    if not record.is_file() or not config.is_file():
        raise ConfigError(f"{run_dir} is not a fine-tuning run directory (no run.json / config.yaml); "
                          "pass the run directories tools/finetune.py made (runs/finetune_...).")
    tool = json.loads(record.read_text()).get("tool")
    if tool != "finetune":
        raise ConfigError(f"{run_dir} was made by {tool!r}, not tools/finetune.py; a soup averages fine-tuned classifiers.")
    checkpoints = list_checkpoints(run_dir / "checkpoints")
    if not checkpoints:
        raise ConfigError(f"{run_dir} has no checkpoint; finish its fine-tuning (the same command resumes it) first.")
    stored = load_file(str(checkpoints[-1] / "model.safetensors"))
    prefix = WEIGHTS[weights]
    state = {key[len(prefix):]: value for key, value in stored.items() if key.startswith(prefix)}
    if not state or (weights == "swa" and int(stored.get("swa.n_averaged", torch.zeros(())).item()) == 0):
        raise ConfigError(f"{run_dir} has no {weights.upper()} weights: fine-tune it with {_FLAGS[weights]}, "
                          "or pass --weights raw.")
    cfg, encoder = load_config(config), str(json.loads(record.read_text()).get("encoder"))
    if encoder == "pixels":
        raise ConfigError(f"{run_dir} is a raw-pixel baseline, which has no backbone weights to average.")
    if not Path(encoder).exists():  # a backbone name (random init): the config keeps only its kwargs
        cfg.backbone.name = encoder.removeprefix("timm:")
    return Ingredient(run_dir.name, run_dir, cfg, state)


def check_same_architecture(ingredients: list[Ingredient]) -> None:
    """One architecture (backbone, its kwargs, input size, and every tensor's name and shape) or a ConfigError."""
    first = ingredients[0]
    shapes = {key: tuple(value.shape) for key, value in first.state.items()}
    for other in ingredients[1:]:
        if other.architecture != first.architecture or shapes != {k: tuple(v.shape) for k, v in other.state.items()}:
            raise ConfigError(
                f"runs {first.name} ({_describe(first)}) and {other.name} ({_describe(other)}) have different "
                "architectures; a soup averages the weights of one architecture fine-tuned from one encoder: "
                "pass runs of the same encoder.")


def average_state_dicts(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The element-wise mean of floating-point tensors (in float64, cast back); integer ones (BatchNorm's
    num_batches_tracked) are counters, not weights: the first state's value."""
    out = {}
    for key, first in states[0].items():
        if first.is_floating_point():
            total = torch.stack([state[key].double() for state in states]).mean(dim=0)  # [n, ...] -> [...]
            out[key] = total.to(first.dtype)
        else:
            out[key] = first.clone()
    return out


@dataclass
class GreedySoup:
    kept: list[str]  # ingredient names, in the order they were added
    state: dict[str, torch.Tensor]
    holdout_top1: float
    trials: list[dict]  # every candidate tried: {"name", "holdout_top1" of the soup with it, "kept"}


def greedy_soup(
    states: dict[str, dict[str, torch.Tensor]], holdout_top1: dict[str, float],
    score: Callable[[dict[str, torch.Tensor]], float],
) -> GreedySoup:
    """Recipe 1 of Wortsman et al. 2022: ingredients in decreasing held-out accuracy (`holdout_top1`, already
    measured); the soup starts as the best one, and each next one stays only if `score` (held-out top-1 of
    a state dict) of the uniform average of the kept ones plus it beats the soup's score so far."""
    order = sorted(states, key=lambda name: holdout_top1[name], reverse=True)
    kept, best = [order[0]], holdout_top1[order[0]]
    soup, trials = states[order[0]], []
    for name in order[1:]:
        candidate = average_state_dicts([states[k] for k in kept + [name]])
        value = score(candidate)
        trials.append({"name": name, "holdout_top1": value, "kept": value > best})
        if value > best:
            kept, best, soup = kept + [name], value, candidate
    return GreedySoup(kept, soup, best, trials)


def has_batch_norm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def _describe(ingredient: Ingredient) -> str:
    arch = ingredient.architecture
    kwargs = ", ".join(f"{k}={v}" for k, v in sorted(arch["kwargs"].items()))
    return f"{arch['backbone']}({kwargs}) at {arch['image_size']} px"
