"""Pretrain an encoder: `accelerate launch pretrain.py --config configs/X.yaml [section.key=value ...]`.

A thin wrapper over selfsup.cli.pretrain (installed: `selfsup-pretrain`), so the commands of a checkout keep
working: `python pretrain.py ...` (one process), `accelerate launch [--multi_gpu --num_processes 2] pretrain.py ...`.
"""

from __future__ import annotations

import sys

from selfsup.cli.pretrain import *  # noqa: F401,F403  (main, cli, parse_args, run_pretraining, compare_line, ...)
from selfsup.cli.pretrain import cli

if __name__ == "__main__":
    sys.exit(cli())
