"""`python tools/soup.py ...`: a thin wrapper over selfsup.cli.soup (installed: `selfsup-soup`); `--help` for its options."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from selfsup.cli.soup import *  # noqa: E402,F401,F403
from selfsup.cli.soup import main  # noqa: E402

if __name__ == "__main__":
    main()
