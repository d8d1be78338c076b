"""`python tools/benchmark.py ...`: a thin wrapper over selfsup.cli.benchmark (installed: `selfsup-benchmark`); `--help` for its options."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from selfsup.cli.benchmark import *  # noqa: E402,F401,F403
from selfsup.cli.benchmark import main  # noqa: E402

if __name__ == "__main__":
    main()
