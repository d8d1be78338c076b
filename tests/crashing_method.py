"""Methods that raise at a chosen forward call: simulate a run killed mid-training.

Also exercises the `module:Class` route for methods defined outside the package.
"""

from selfsup.methods.dino import DINO
from selfsup.methods.moco import MoCo
from selfsup.methods.simclr import SimCLR

CRASH_AT_CALL: int | None = None  # set by the test; None disables the crash
_calls = 0


class SimulatedKill(RuntimeError):
    pass


def _count_and_maybe_crash() -> None:
    global _calls
    _calls += 1
    if CRASH_AT_CALL is not None and _calls >= CRASH_AT_CALL:
        raise SimulatedKill(f"simulated kill at forward call {_calls}")


class CrashingSimCLR(SimCLR):
    def forward(self, batch):
        _count_and_maybe_crash()
        return super().forward(batch)


class CrashingMoCo(MoCo):
    def forward(self, batch):
        _count_and_maybe_crash()
        return super().forward(batch)


def reset(crash_at: int | None) -> None:
    global CRASH_AT_CALL, _calls
    CRASH_AT_CALL, _calls = crash_at, 0


class CrashingDINO(DINO):
    def forward(self, batch):
        _count_and_maybe_crash()
        return super().forward(batch)
