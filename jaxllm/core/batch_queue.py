"""The batch queue of pipeline parallelism (vLLM V1's): micro-batches in flight, by stage. Host only.

With P stages, the engine schedules a new batch every tick while up to P - 1 earlier ones are
still in the pipeline: window[s] is the batch stage s runs in the coming tick (entered s ticks
ago); the batch at stage P - 1 completes in that tick and its tokens come back. A request is in
at most one in-flight batch: the scheduler is told `request_ids()` and never schedules them
(its next token depends on the one in flight), and `advance` asserts the batches are disjoint.

An empty stage-tick (a bubble) records why the engine had nothing to push at that stage's turn:
  "in_flight"  every unfinished request was already in the pipeline (too few requests for P
               batches: pipeline fill/drain, the long tail of a run)
  "blocked"    requests were waiting outside the pipeline but none could be scheduled (no KV
               blocks or seats free, or an in-flight request was the only preemption victim)
"""

from __future__ import annotations

import collections
import dataclasses


@dataclasses.dataclass
class InFlight:
    """One micro-batch in the pipeline: the scheduler's plan and the step inputs it runs."""

    plan: object  # SchedulerOutput
    step: object  # StepInputs

    @property
    def request_ids(self) -> set[str]:
        return {item.request_id for item in self.plan.scheduled}


class BatchQueue:
    def __init__(self, num_stages: int):
        self.num_stages = num_stages
        self.window: list[InFlight | str | None] = [None] * num_stages  # InFlight, a bubble reason, None
        self.num_ticks = 0
        self.busy_stage_ticks = 0
        self.idle_stage_ticks: collections.Counter = collections.Counter()  # reason -> stage-ticks
        self.max_in_flight = 0  # most micro-batches in the pipeline during one tick
        self.deferred_aborts: list[str] = []

    def request_ids(self) -> frozenset[str]:
        """Requests whose token is in flight (the scheduler must not schedule them)."""
        return frozenset(rid for e in self.window if isinstance(e, InFlight) for rid in e.request_ids)

    @property
    def in_flight(self) -> bool:
        return any(isinstance(e, InFlight) for e in self.window)

    def advance(self, entry: InFlight | None, bubble_reason: str = "in_flight") -> list:
        """Shift every batch one stage on and put `entry` (None: a bubble) at stage 0. Returns the
        window for the tick: [StepInputs or None] by stage."""
        if entry is not None:
            overlap = entry.request_ids & self.request_ids()
            assert not overlap, f"requests {sorted(overlap)} would be in two in-flight batches"
        self.window = [entry if entry is not None else bubble_reason] + self.window[:-1]
        self.num_ticks += 1
        self.max_in_flight = max(self.max_in_flight, sum(isinstance(e, InFlight) for e in self.window))
        for e in self.window:
            if isinstance(e, InFlight):
                self.busy_stage_ticks += 1
            else:
                self.idle_stage_ticks[e or "fill"] += 1  # None: slots never used yet
        return [e.step if isinstance(e, InFlight) else None for e in self.window]

    def complete(self) -> InFlight | None:
        """The batch that left the last stage in the tick just run (removed from the window)."""
        done, self.window[-1] = self.window[-1], None
        return done if isinstance(done, InFlight) else None

    def clear(self) -> list[InFlight]:
        """Drop every in-flight batch (after a failed tick); returns them."""
        dropped = [e for e in self.window if isinstance(e, InFlight)]
        self.window = [None] * self.num_stages
        return dropped

    def bubble_fraction(self) -> float:
        """Idle stage-ticks / all stage-ticks so far."""
        total = self.num_ticks * self.num_stages
        return 0.0 if total == 0 else 1 - self.busy_stage_ticks / total

    def stats(self) -> dict:
        return {"num_ticks": self.num_ticks, "max_in_flight": self.max_in_flight, "busy_stage_ticks": self.busy_stage_ticks,
                "idle_stage_ticks": dict(self.idle_stage_ticks), "bubble_fraction": self.bubble_fraction()}
