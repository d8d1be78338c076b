"""The benchmark's report formatting; lives in selfsup.cli.benchmark_report."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from selfsup.cli.benchmark_report import *  # noqa: E402,F401,F403
