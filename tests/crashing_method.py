"""A SimCLR that raises at a chosen forward call: simulates a run killed mid-training.

Also exercises the `module:Class` route for methods defined outside the package.
"""

from selfsup.methods.simclr import SimCLR

CRASH_AT_CALL: int | None = None  # set by the test; None disables the crash
_calls = 0


class SimulatedKill(RuntimeError):
    pass


class CrashingSimCLR(SimCLR):
    def forward(self, batch):
        global _calls
        _calls += 1
        if CRASH_AT_CALL is not None and _calls >= CRASH_AT_CALL:
            raise SimulatedKill(f"simulated kill at forward call {_calls}")
        return super().forward(batch)


def reset(crash_at: int | None) -> None:
    global CRASH_AT_CALL, _calls
    CRASH_AT_CALL, _calls = crash_at, 0
