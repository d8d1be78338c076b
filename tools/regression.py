"""`python tools/regression.py`: the accuracy floor CI enforces, a thin wrapper over selfsup.regression.

    python tools/regression.py                              # every family in tests/regression_floor.json; exit 1 on a failure
    python tools/regression.py --family contrastive         # one family
    python tools/regression.py --update-floor               # measure again on 2 seeds and rewrite the floors (never in CI)

The runs train on the CPU class the floors were measured on (ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2, fp32,
no GPU) unless the environment sets those variables; .ci/run sets the same.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from selfsup.regression import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
