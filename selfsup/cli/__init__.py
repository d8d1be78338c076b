"""The command-line programs (`selfsup-pretrain`, `selfsup-knn`, `selfsup-linear-probe`, `selfsup-finetune`,
`selfsup-benchmark`; also `pretrain.py` and `tools/*.py` in a checkout).

Each parses its arguments before importing torch, accelerate or timm, so `--help` and argument errors are
immediate; the work's imports happen inside the functions that do it.
"""
