"""`python tools/report.py RUN [RUN ...]`: a thin wrapper over selfsup.cli.report (installed: `selfsup-report`)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from selfsup.cli.report import main  # noqa: E402

if __name__ == "__main__":
    main()
