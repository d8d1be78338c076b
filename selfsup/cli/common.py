"""What the evaluation commands share before any heavy import: their flags, `--print-config`, and one-line exits
for a user's mistakes. Imports nothing beyond the standard library and selfsup.config (yaml)."""

from __future__ import annotations

import argparse
import functools
import sys
from typing import Any

# (flag, dotted config key, argparse keywords): each flag is sugar for one override
COMMON_FLAGS: list[tuple[str, str, dict[str, Any]]] = [
    ("--dataset", "data.dataset", {"help": "labelled dataset, as in pretraining (default: the encoder's)"}),
    ("--root", "data.root", {"help": "dataset directory; image_folder: one sub-folder per class (split folders train/ test/ optional)"}),
    ("--image-size", "data.image_size", {"type": int, "help": "default: the encoder's pretraining size"}),
    ("--max-train", "data.subset", {"type": int, "help": "a fixed random subset of the train split"}),
    ("--max-test", "eval.max_test_samples", {"type": int, "help": "a fixed random subset of the test split"}),
    ("--seed", "train.seed", {"type": int}),
]


def build_parser(description: str, flags: list[tuple[str, str, dict[str, Any]]]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoder", required=True,
                        help="exported encoder dir, run dir or checkpoint dir; a backbone name at random init "
                             "(resnet18_small, timm:resnet18); or 'pixels' (raw pixels, the baseline)")
    parser.add_argument("--config", default=None, help="YAML with the usual sections (data, optim, train, eval, probe, finetune)")
    for flag, key, kwargs in COMMON_FLAGS + flags:
        parser.add_argument(flag, dest=dest(flag), default=None, **{"help": f"= {key}", **kwargs})
    parser.add_argument("--output-dir", default=None, help="run directory (default: train.output_dir/<tool>_<encoder>_<dataset>)")
    parser.add_argument("--output", default=None, help="also write the JSON result here")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=0.1 train.epochs=20")
    return parser


def dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def print_config(cfg) -> dict[str, Any]:
    """--print-config: the resolved config as YAML on stdout (what the run would record in config.yaml)."""
    import yaml

    from selfsup.config import to_dict

    resolved = to_dict(cfg)
    print(yaml.safe_dump(resolved, sort_keys=False), end="", flush=True)
    return resolved


def user_errors() -> tuple[type[BaseException], ...]:
    """Mistakes a user can make on the command line; EncoderLoadError only once export is imported."""
    from selfsup.config import ConfigError

    errors: list[type[BaseException]] = [ConfigError, FileNotFoundError]
    export = sys.modules.get("selfsup.export")
    if export is not None:
        errors.append(export.EncoderLoadError)
    return tuple(errors)


def exit_on_user_error(main):
    """Run a tool's main; a config or input mistake exits with its message instead of a traceback."""

    @functools.wraps(main)
    def wrapped(argv: list[str] | None = None):
        try:
            return main(argv)
        except Exception as e:
            if isinstance(e, user_errors()):
                sys.exit(f"error: {e}")
            raise

    return wrapped


def console(main) -> int:
    """A console script's exit status: 0 once main returns (its result is printed, not returned to the shell)."""
    main()
    return 0
