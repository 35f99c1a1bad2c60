"""VirtualClock: the simulator's time, advanced by predicted step times instead of passing.
Host only: never imports jax."""

from __future__ import annotations

import math


class VirtualClock:
    """A callable clock (seconds) for Engine-shaped code: `clock()` reads it, `advance(dt)` and
    `advance_to(t)` move it forward. `reset_to(t)` may move it anywhere: replay pins each step to
    the recorded run's start time, which can be earlier than where a predicted step ended."""

    def __init__(self, start: float = 0.0):
        self.now = _finite(start, "start")

    def __call__(self) -> float:
        return self.now

    def advance(self, dt: float) -> None:
        dt = _finite(dt, "dt")
        if dt < 0:
            raise ValueError(f"a clock only moves forward: dt={dt!r} < 0")
        self.now += dt

    def advance_to(self, t: float) -> None:
        """Move to time t if it is later (an idle gap until an arrival); earlier t is a no-op."""
        self.now = max(self.now, _finite(t, "t"))

    def reset_to(self, t: float) -> None:
        self.now = _finite(t, "t")


def _finite(x, name: str) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        raise ValueError(f"{name} must be a finite number of seconds, got {x!r}")
    return float(x)
