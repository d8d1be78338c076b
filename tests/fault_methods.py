"""SimCLR variants that inject faults, named in test configs as `tests.fault_methods:Class`."""

from __future__ import annotations

import json
import os
import time

import torch

from selfsup.methods.simclr import SimCLR


class SlowSimCLR(SimCLR):
    """Sleeps SELFSUP_TEST_STEP_SLEEP seconds per forward so a test can signal a run mid-way; same numerics."""

    def forward(self, batch):
        time.sleep(float(os.environ.get("SELFSUP_TEST_STEP_SLEEP", "0")))
        return super().forward(batch)


class NaNSimCLR(SimCLR):
    """Returns a NaN loss on forward calls listed in SELFSUP_TEST_NAN_CALLS (comma-separated, 1-based)."""

    calls = 0

    def forward(self, batch):
        type(self).calls += 1
        out = super().forward(batch)
        bad = {int(c) for c in os.environ.get("SELFSUP_TEST_NAN_CALLS", "").split(",") if c}
        if type(self).calls in bad:
            out.loss = out.loss * torch.tensor(float("nan"))
        return out


class RecordingSimCLR(SlowSimCLR):
    """Appends each batch's labels (one JSON list per line) to SELFSUP_TEST_RECORD: with shards whose label is
    the sample's number, the file says which samples every step saw."""

    def forward(self, batch):
        path = os.environ.get("SELFSUP_TEST_RECORD")
        if path:
            with open(path, "a") as f:
                f.write(json.dumps(batch[1].tolist()) + "\n")
        return super().forward(batch)
