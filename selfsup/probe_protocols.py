"""The linear-probe protocol of each method family, as its authors' released code runs it.

tools/linear_probe.py picks the protocol of the method that trained the encoder (`method` in its
selfsup.json; `--protocol` / `probe.protocol` overrides) and layers it under the encoder's record, the
--config file, the flags and the overrides, so any key can still be changed; the tool prints which
protocol ran, its source, and every key of it that the run changed. docs/recipes.md lists each value with
the file and line it comes from (commits: facebookresearch/moco 90e244a, moco-v3 c349e6e, mae efb2a80,
google-research/simclr 383d414).

Two things stay this project's on purpose, whatever the protocol: the batch is `data.batch_size` (256) with
the lr scaled linearly from the per-256 rate, and features are cached once without augmentation unless
`--augment` (the released scripts all train on random-resized-crop + flip views).

Imports nothing heavy: the tool reads it before torch is loaded.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from selfsup.config import ConfigError


@dataclass(frozen=True)
class Protocol:
    name: str
    label: str  # one line: whose protocol, in words
    source: str  # repository, file and lines of the released code
    settings: dict[str, Any]  # config sections (optim, train, probe) the protocol sets

    def recipe(self) -> dict[str, Any]:
        """The tool's recipe under this protocol: the shared batch and eval keys plus the protocol's own."""
        base = {"data": {"batch_size": 256}, "train": {"log_every_steps": 50}, "eval": {"max_test_samples": None}}
        for section, values in self.settings.items():
            base[section] = {**base.get(section, {}), **copy.deepcopy(values)}
        return base


PROTOCOLS: dict[str, Protocol] = {
    "moco": Protocol(
        "moco", "MoCo v1/v2 linear classification: plain momentum SGD at lr 30 on the un-normalised features",
        "facebookresearch/moco main_lincls.py L38 (100 epochs), L47 (lr 30), L49 (x0.1 at 60, 80), L51, L53 "
        "(momentum 0.9, wd 0), L152 (fc N(0, 0.01)), L214 (torch.optim.SGD)",
        {"optim": {"name": "sgd", "lr": 30.0, "lr_scaling": "linear", "weight_decay": 0.0, "momentum": 0.9,
                   "warmup_epochs": 0.0, "schedule": "step", "lr_milestones": [60.0, 80.0]},
         "train": {"epochs": 100},
         "probe": {"batch_norm": False, "zero_init": False}},
    ),
    "moco_v3": Protocol(
        "moco_v3", "MoCo v3 linear classification: plain momentum SGD, lr 0.1 per 256 (ViTs: 3), cosine",
        "facebookresearch/moco-v3 main_lincls.py L49 (90 epochs), L58 (lr 0.1), L60-63 (momentum 0.9, wd 0), "
        "L168 (fc N(0, 0.01)), L196 (lr x batch / 256), L236 (torch.optim.SGD), L499-501 (cosine); "
        "CONFIG.md L144 (ViT: --lr=3)",
        {"optim": {"name": "sgd", "lr": 0.1, "lr_scaling": "linear", "weight_decay": 0.0, "momentum": 0.9,
                   "warmup_epochs": 0.0, "schedule": "cosine", "min_lr": 0.0},
         "train": {"epochs": 90},
         "probe": {"batch_norm": False, "zero_init": False}},
    ),
    "mae": Protocol(
        "mae", "MAE linear probing: BatchNorm without affine before the linear layer, LARS, lr 0.1 per 256",
        "facebookresearch/mae main_linprobe.py L46 (90 epochs), L55 (wd 0), L60 (blr 0.1), L63 (min lr 0), "
        "L66 (warmup 10), L222 (BatchNorm1d(affine=False, eps=1e-6)), L252 (util/lars.py LARS); "
        "util/lr_sched.py L9-15 (warmup + half-cycle cosine)",
        {"optim": {"name": "lars", "lr": 0.1, "lr_scaling": "linear", "weight_decay": 0.0, "momentum": 0.9,
                   "warmup_epochs": 10.0, "schedule": "cosine", "min_lr": 0.0},
         "train": {"epochs": 90},
         "probe": {"batch_norm": True, "zero_init": False}},
    ),
    "simclr": Protocol(
        "simclr", "SimCLR linear evaluation: Nesterov momentum SGD, lr 0.1 per 256, cosine, zero-initialised head",
        "google-research/simclr README.md L116-120 (momentum optimizer, lr 0.1, wd 0, 100 epochs, warmup 0, "
        "--zero_init_logits_layer); model_util.py L64-65 (linear scaling), L74-81 (cosine), L88-90 (use_nesterov)",
        {"optim": {"name": "nesterov", "lr": 0.1, "lr_scaling": "linear", "weight_decay": 0.0, "momentum": 0.9,
                   "warmup_epochs": 0.0, "schedule": "cosine", "min_lr": 0.0},
         "train": {"epochs": 100},
         "probe": {"batch_norm": False, "zero_init": True}},
    ),
}

# method that trained the encoder -> protocol family. SimMIM's release has no linear-probe script: it gets the
# masked-image family's (MAE's), and says so.
FAMILY = {"moco": "moco", "moco_v2": "moco", "moco_v3": "moco_v3", "mae": "mae", "simmim": "mae", "simclr": "simclr"}
FALLBACK = "moco_v3"  # no method recorded (random init, pixels, a timm name, an encoder of another method)


def protocol_for(meta: dict[str, Any], requested: str | None, vit: bool) -> tuple[Protocol, str]:
    """(protocol, why): `requested` (--protocol) if given, else the family of the encoder's method."""
    if requested is not None:
        if requested not in PROTOCOLS:
            raise ConfigError(f"probe.protocol (--protocol) {requested!r} is not one of {', '.join(PROTOCOLS)}.")
        name, why = requested, "--protocol / probe.protocol"
    else:
        method = meta.get("method")
        key = f"{method}_{meta['variant']}" if method == "moco" and meta.get("variant") else method
        if key in FAMILY:
            name = FAMILY[key]
            why = f"the encoder was trained by {key}" + (" (SimMIM releases no linear probe; MAE's)" if key == "simmim" else "")
        else:
            name = FALLBACK
            why = (f"the encoder records no method ({'random init' if meta.get('random_init') else 'pixels' if meta.get('pixels') else 'unknown'}); "
                   if method is None else f"no protocol for method {method!r}; ") + "pass --protocol to match the encoder you compare with"
    protocol = PROTOCOLS[name]
    if name == "moco_v3" and vit:  # CONFIG.md L144 / L174: ViT-S and ViT-B probe at --lr=3
        settings = copy.deepcopy(protocol.settings)
        settings["optim"]["lr"] = 3.0
        protocol = Protocol(name, protocol.label, protocol.source, settings)
    return protocol, why


def changed_keys(protocol: Protocol, cfg: Any) -> list[str]:
    """`section.key=value` for every key the protocol sets that the run's config changed (file, flags, overrides)."""
    out = []
    for section, values in protocol.settings.items():
        for key, value in values.items():
            actual = getattr(getattr(cfg, section), key)
            if isinstance(actual, tuple):
                actual = list(actual)
            if actual != value:
                out.append(f"{section}.{key}={actual!r} (protocol: {value!r})")
    return out
