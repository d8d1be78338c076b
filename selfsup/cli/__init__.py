"""The command-line programs (`selfsup-pretrain`, `selfsup-knn`, `selfsup-linear-probe`, `selfsup-finetune`,
`selfsup-benchmark`, `selfsup-report`, `selfsup-soup`; also `pretrain.py` and `tools/*.py` in a checkout).

Each parses its arguments before importing torch, accelerate or timm, so `--help` and argument errors are
immediate; the work's imports happen inside the functions that do it.
"""

import os as _os

# OpenMP threads that spin while waiting collapse when another process takes a core (2 cores, fp32: 158 ->
# 63 img/s with one busy neighbour); sleeping ones keep 84 at no cost when idle (157). libgomp reads this
# when torch loads, which the commands do after parsing their arguments; a value the user set wins.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
