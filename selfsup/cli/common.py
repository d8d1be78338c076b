"""What the evaluation commands share before any heavy import: their flags, `--print-config`, and one-line exits
for a user's mistakes. Imports nothing beyond the standard library and selfsup.config (yaml)."""

from __future__ import annotations

import argparse
import functools
import sys
import traceback
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
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
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
    """Failures a user causes or fixes (a config key, a path, an input file, a run's settings), printed as one
    line without --debug. Only classes of modules already imported, so this adds no import. ValueError covers
    the config and backbone checks (CheckpointLoadError, ConfigError are ValueErrors); a bug that raises one
    still shows its traceback under --debug."""
    from selfsup.config import ConfigError

    errors: list[type[BaseException]] = [ConfigError, FileNotFoundError, ValueError]
    for module, name in (("selfsup.export", "EncoderLoadError"), ("selfsup.data", "BrokenImageError"),
                         ("selfsup.checkpoints", "CheckpointLoadError"), ("selfsup.engine", "NonFiniteLossError")):
        if (found := getattr(sys.modules.get(module), name, None)) is not None:
            errors.append(found)
    return tuple(errors)


def exit_status(error: BaseException, debug: bool) -> tuple[int, str] | None:
    """(exit status, one-line message) of a stop the user caused: Ctrl-C 130, SIGTERM 143 (128 + the signal, as
    a shell reports it), a known mistake 1. None: let it raise with its traceback (a bug, or a mistake with --debug)."""
    engine = sys.modules.get("selfsup.engine")
    if engine is not None and isinstance(error, engine.TrainingInterrupted):
        return (130 if error.signal_name == "SIGINT" else 143), f"stopped: {_one_line(error)}"
    if isinstance(error, KeyboardInterrupt):
        return 130, "stopped: interrupted (Ctrl-C)"
    if isinstance(error, user_errors()) and not debug:
        return 1, f"error: {_one_line(error)}"
    return None


def _one_line(error: BaseException) -> str:
    return " ".join(line.strip() for line in str(error).splitlines() if line.strip()) or type(error).__name__


def wants_debug(argv: list[str] | None) -> bool:
    return "--debug" in (sys.argv[1:] if argv is None else argv)


def exit_on_user_error(main):
    """Run a command's main; a stop the user caused exits with its status and one line instead of a traceback
    (`--debug`: the traceback as well)."""

    @functools.wraps(main)
    def wrapped(argv: list[str] | None = None):
        try:
            return main(argv)
        except (Exception, KeyboardInterrupt) as e:
            debug = wants_debug(argv)
            outcome = exit_status(e, debug)
            if outcome is None:
                raise
            status, message = outcome
            if debug:
                traceback.print_exc()
            if status == 1:
                sys.exit(message)  # SystemExit carrying the message: printed on stderr, status 1
            print(message, file=sys.stderr, flush=True)
            sys.exit(status)

    return wrapped


DEBUG_HELP = "show the traceback of a failure (without it, a mistake you can fix prints one line 'error: ...')"


def console(main) -> int:
    """A console script's exit status: 0 once main returns (its result is printed, not returned to the shell)."""
    main()
    return 0
