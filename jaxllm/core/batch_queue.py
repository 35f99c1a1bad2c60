"""The batch queue of pipeline parallelism (vLLM V1's): micro-batches in flight, by stage. Host only.

With P stages, the engine schedules a new batch every tick while up to P - 1 earlier ones are
still in the pipeline: window[s] is the batch stage s runs in the coming tick (entered s ticks
ago); the batch at stage P - 1 completes in that tick and its tokens come back. A request is in
at most one in-flight batch: the scheduler is told `request_ids()` and never schedules them
(its next token depends on the one in flight), and `advance` asserts the batches are disjoint.

With host/device overlap (ParallelConfig.pipeline_overlap_host) the batch that left the last
stage is `pending` until the engine reads its tokens, which it does after dispatching the next
tick: it stays in `request_ids()` (its requests are still not schedulable) and counts as in flight.

An empty stage-tick (a bubble) records why the engine had nothing to push at that stage's turn
(stage 0 idles for that reason, and the bubble keeps it as it moves down the stages):
  "fill"       a stage slot not reached yet by the first batch (pipeline fill)
  "drain"      every unfinished request was in the pipeline and there were fewer than P of them:
               no batching could fill P batches (the long tail of a run)
  "in_flight"  every unfinished request was in the pipeline, at least P of them: the earlier
               batches took them all (unbalanced micro-batches)
  "seats"      requests were waiting, but max_num_seqs requests ran, all in the pipeline
  "kv_blocks"  a request outside the pipeline could have run but KV blocks ran out (it waits
               for blocks, or was preempted; an in-flight request is never a victim)
The token budget never empties a batch (with nothing scheduled the whole budget is free); it
only caps batches, which the inspector counts apart (experiments/inspect_pipeline.py).
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


BUBBLE_REASONS = ("fill", "drain", "in_flight", "seats", "kv_blocks")


def bubble_reason(scheduler, in_flight: frozenset, num_stages: int) -> str:
    """Why the scheduler scheduled nothing this tick (module docstring), from its state after
    scheduling: `in_flight` are the request ids in the pipeline."""
    outside = [r for r in scheduler.running if r.request_id not in in_flight]
    if outside or (scheduler.num_waiting and scheduler.num_running < scheduler.max_num_seqs):
        return "kv_blocks"
    if scheduler.num_waiting:
        return "seats"
    return "drain" if scheduler.num_running < num_stages else "in_flight"


class BatchQueue:
    def __init__(self, num_stages: int):
        self.num_stages = num_stages
        self.window: list[InFlight | str | None] = [None] * num_stages  # InFlight, a bubble reason, None
        self.num_ticks = 0
        self.busy_stage_ticks = 0
        self.idle_stage_ticks: collections.Counter = collections.Counter()  # reason -> stage-ticks
        self.max_in_flight = 0  # most micro-batches in the pipeline during one tick
        self.deferred_aborts: list[str] = []
        # Overlap only: the batch that left the last stage, its tokens not read yet, and its
        # outputs (the runner's, opaque here).
        self.pending: InFlight | None = None
        self.pending_outputs = None

    def _batches(self) -> list[InFlight]:
        return [e for e in self.window + [self.pending] if isinstance(e, InFlight)]

    def request_ids(self) -> frozenset[str]:
        """Requests whose token is in flight (the scheduler must not schedule them)."""
        return frozenset(rid for e in self._batches() for rid in e.request_ids)

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
        self.max_in_flight = max(self.max_in_flight, len(self._batches()))
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

    def swap_pending(self, done: InFlight | None, outputs) -> tuple[InFlight | None, object]:
        """Overlap: make (done, outputs) the pending batch; returns the previous (batch, outputs)."""
        previous = (self.pending, self.pending_outputs)
        self.pending, self.pending_outputs = done, outputs if done is not None else None
        return previous

    def clear(self) -> list[InFlight]:
        """Drop every in-flight batch, pending included (after a failed tick); returns them."""
        dropped = self._batches()
        self.window = [None] * self.num_stages
        self.pending = self.pending_outputs = None
        return dropped

    def bubble_fraction(self) -> float:
        """Idle stage-ticks / all stage-ticks so far."""
        total = self.num_ticks * self.num_stages
        return 0.0 if total == 0 else 1 - self.busy_stage_ticks / total

    def stats(self) -> dict:
        return {"num_ticks": self.num_ticks, "max_in_flight": self.max_in_flight, "busy_stage_ticks": self.busy_stage_ticks,
                "idle_stage_ticks": dict(self.idle_stage_ticks), "bubble_fraction": self.bubble_fraction()}
