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
The driver also notes, for each request, how many of this run's step records came before it was
added (`added_at_step`) and its place in the add order (`add_index`): what jaxllm.sim.replay
needs to add it at the same step boundary, in the same queue order.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Sequence

from jaxllm.bench import metrics
from jaxllm.observers import StepStats
from jaxllm.sampling_params import SamplingParams


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
    specs: dict  # request_id -> its RequestSpec
    added: dict  # request_id -> (added_at_step, add_index) (see the module docstring)

    @property
    def duration(self) -> float:
        return self.end_time - self.start_time

    def request_rows(self, origin: float | None = None, finished_only: bool = False) -> list[dict]:
        """One metrics.request_row per request (times relative to `origin`, default the run's
        start), plus added_at_step / add_index / prompt_token_ids / output_token_ids (replay).
        A request that was refused or did not finish keeps its row with the error."""
        origin = self.start_time if origin is None else origin
        rows = []
        for rid, spec in self.specs.items():
            out = self.outputs.get(rid)
            if out is None:
                if not finished_only:
                    rows.append(metrics.request_row(rid, spec.prompt_len, spec.output_len, None,
                                                    arrival_time=self.arrival_times.get(rid), origin=origin,
                                                    error=self.errors.get(rid, "did not finish")))
                continue
            got = sum(len(c.token_ids) for c in out.outputs)
            error = out.error or (None if got == spec.output_len * spec.n
                                  else f"{got} output tokens, {spec.output_len * spec.n} requested")
            row = metrics.request_row(rid, spec.prompt_len, spec.output_len, out.metrics, num_output_tokens=got,
                                      error=error, origin=origin, token_ids=[c.token_ids for c in out.outputs])
            step, index = self.added[rid]
            row.update(added_at_step=step, add_index=index, prompt_token_ids=list(out.prompt_token_ids),
                       output_token_ids=list(out.outputs[0].token_ids))
            rows.append(row)
        return rows

    @property
    def requests(self) -> list[dict]:
        """The finished requests' rows with times on the engine's clock, as jaxllm.sim.replay
        takes them (with `steps`)."""
        return self.request_rows(origin=0.0, finished_only=True)

    def requests_frame(self):
        import pandas as pd

        return pd.DataFrame(self.requests)

    def steps_frame(self):
        """The StepStats as a DataFrame on the engine's clock, tuples kept (replay, sim.fit);
        metrics.step_table is the results-file form."""
        import pandas as pd

        return pd.DataFrame([metrics.record_dict(s) for s in self.steps])

    def request_table(self):
        """metrics.request_table of every request, times relative to the run's start."""
        return metrics.request_table(self.request_rows())

    def step_table(self):
        return metrics.step_table(self.steps, origin=self.start_time)

    def summary(self, slos: dict | None = None, block_size: int | None = None) -> dict:
        """metrics.summarize over this run (throughput, TTFT / TPOT / ITL / e2el, KV, steps)."""
        return metrics.summarize(self.request_table(), self.step_table(), self.duration, slos, block_size)


def greedy_params(spec) -> SamplingParams:
    """A spec's default: greedy, ignore_eos, max_tokens = its output_len (exact lengths, so a
    real run and its simulation produce the same number of tokens)."""
    return SamplingParams(n=spec.n, max_tokens=spec.output_len, ignore_eos=True, temperature=0.0)


class TimedDriver:
    def __init__(self, engine, clock: Callable[[], float] | None = None,
                 wait_until: Callable[[float], None] | None = None) -> None:
        """clock: seconds (default: the engine's own `clock`, else time.monotonic); it must be
        the clock the engine stamps its records with. wait_until(t): return once clock() >= t
        (default: the engine's `advance_to` if it has one, a simulator's virtual clock, else sleep)."""
        self.engine = engine
        self.clock = clock or getattr(engine, "clock", None) or time.monotonic
        self.wait_until = wait_until or getattr(engine, "advance_to", None) or sleep_until(self.clock)

    def run(self, requests: Sequence[tuple], arrivals: Sequence[float]) -> DriverResult:
        """requests: a Workload, [RequestSpec] (greedy_params each) or [(RequestSpec,
        SamplingParams)]; arrivals: [seconds after start], one per request."""
        requests = [r if isinstance(r, tuple) else (r, greedy_params(r))
                    for r in getattr(requests, "requests", requests)]
        if len(requests) != len(arrivals):
            raise ValueError(f"{len(requests)} requests but {len(arrivals)} arrival times")
        steps: list[StepStats] = []
        self.engine.add_step_observer(steps.append)
        outputs, errors, arrival_at, added = {}, {}, {}, {}
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
                        added[spec.request_id] = (len(steps), len(added))
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
        specs = {spec.request_id: spec for spec, _ in requests}
        return DriverResult(start, end, outputs, arrival_at, steps, errors, specs, added)
