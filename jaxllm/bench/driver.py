"""The timed driver: sends a workload's requests to an Engine-like system at their arrival
times, in-process, and steps it (host only, never imports jax).

    driver = TimedDriver(engine)                       # the real engine: time.monotonic / sleep
    result = driver.run(requests, arrivals)            # requests: [(RequestSpec, SamplingParams)]

The loop: add every request whose arrival time has come, step while anything is unfinished, and
when the system is idle wait until the next arrival. The clock and the wait are injected, so a
simulated system (its own virtual clock; a wait that advances it) plugs in unchanged. Anything
with add_request(request_id, prompt, params, arrival_time=...), step() -> [RequestOutput],
has_unfinished_requests() and add_step_observer(fn) can be driven.

A request's arrival time is its scheduled arrival (run start + offset), not when the driver got
round to adding it: a busy step delaying its admission counts in its TTFT, as a client would see.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Sequence

from jaxllm.observers import StepStats


def sleep_until(clock: Callable[[], float]) -> Callable[[float], None]:
    """The real-time wait: sleep until clock() reaches t."""
    def wait(t: float) -> None:
        delay = t - clock()
        if delay > 0:
            time.sleep(delay)
    return wait


@dataclasses.dataclass
class DriverResult:
    start_time: float  # the clock when the run started (arrival offsets count from here)
    end_time: float  # when the last request finished
    outputs: dict  # request_id -> its final RequestOutput (RequestMetrics in .metrics)
    arrival_times: dict  # request_id -> absolute scheduled arrival time (clock seconds)
    steps: list[StepStats]
    errors: dict  # request_id -> why add_request refused it

    @property
    def duration(self) -> float:
        return self.end_time - self.start_time


class TimedDriver:
    def __init__(self, engine, clock: Callable[[], float] | None = None,
                 wait_until: Callable[[float], None] | None = None) -> None:
        """clock: seconds (default: the engine's own `clock`, else time.monotonic); it must be
        the clock the engine stamps its records with. wait_until(t): return once clock() >= t."""
        self.engine = engine
        self.clock = clock or getattr(engine, "clock", None) or time.monotonic
        self.wait_until = wait_until or sleep_until(self.clock)

    def run(self, requests: Sequence[tuple], arrivals: Sequence[float]) -> DriverResult:
        """requests: [(RequestSpec, SamplingParams)]; arrivals: [seconds after start], one per
        request, non-decreasing."""
        if len(requests) != len(arrivals):
            raise ValueError(f"{len(requests)} requests but {len(arrivals)} arrival times")
        steps: list[StepStats] = []
        self.engine.add_step_observer(steps.append)
        outputs, errors, arrival_at = {}, {}, {}
        start = self.clock()
        pending = sorted(zip(arrivals, range(len(requests))))
        nxt = 0
        try:
            while nxt < len(pending) or self.engine.has_unfinished_requests():
                now = self.clock()
                while nxt < len(pending) and start + pending[nxt][0] <= now:
                    offset, i = pending[nxt]
                    spec, params = requests[i]
                    arrival_at[spec.request_id] = start + offset
                    try:
                        self.engine.add_request(spec.request_id, {"prompt_token_ids": list(spec.prompt_token_ids)},
                                                params, arrival_time=start + offset)
                    except ValueError as e:  # one bad request is recorded; the run goes on
                        errors[spec.request_id] = str(e)
                    nxt += 1
                if self.engine.has_unfinished_requests():
                    for out in self.engine.step():
                        if out.finished:
                            outputs[out.request_id] = out
                elif nxt < len(pending):
                    self.wait_until(start + pending[nxt][0])
        finally:
            if hasattr(self.engine, "remove_step_observer"):
                self.engine.remove_step_observer(steps.append)
        end = self.clock()  # right after the step the last request finished in
        return DriverResult(start, end, outputs, arrival_at, steps, errors)
