"""Write .ci/lock.txt: the exact versions a fresh `pip install ".[dev]"` takes today, for CI to install with.

    python tools/refresh_lock.py            # resolves with pip (no install), then writes .ci/lock.txt

CI installs with `pip install -c .ci/lock.txt -e ".[dev]"`, so a release that comes out overnight cannot
turn it red; the README's unlocked command keeps taking today's releases. pip resolves torch and
torchvision from the ranges in pyproject.toml (and any local wheels or caps pip is configured with).
"""

from __future__ import annotations

import datetime
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / ".ci" / "lock.txt"


def resolve(extra: str = "dev") -> list[tuple[str, str]]:
    """(name, version) of every package pip would install into an empty environment for `.[extra]`."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
             "--report", str(report), f".[{extra}]"],
            cwd=ROOT, check=True,
        )
        installs = json.loads(report.read_text())["install"]
    return sorted(
        (item["metadata"]["name"], item["metadata"]["version"])
        for item in installs if item["metadata"]["name"].lower() != "selfsup"
    )


def main() -> None:
    pins = resolve()
    header = [
        "# Exact versions CI installs (pip install -c .ci/lock.txt -e \".[dev]\").",
        f"# Resolved {datetime.date.today()} on Python {platform.python_version()} ({platform.machine()}) by",
        "# `python tools/refresh_lock.py`; refresh it deliberately and commit the diff.",
    ]
    LOCK.write_text("\n".join(header + [f"{name}=={version}" for name, version in pins]) + "\n")
    print(f"wrote {LOCK} ({len(pins)} packages)")


if __name__ == "__main__":
    main()
