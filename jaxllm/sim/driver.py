"""The timed loop over an Engine or a SimulatedEngine, and what it records. Host only.

    run = run_workload(engine, make_requests(prompt_lens, output_lens, poisson_arrivals(n, rate)))
    run.requests_frame(), run.steps_frame()      # pandas tables (per request, per step)
    summarize(run.requests)                      # throughput, mean / p90 TTFT

One loop for both, so a measured run and its simulation differ only in the clock and the device:
the loop adds every request whose arrival time has passed, steps while anything is unfinished,
and otherwise waits for the next arrival (sleeps on a real clock, `advance_to` on a virtual one).
A request is stamped with its scheduled arrival, so TTFT includes the wait for the step in flight
to end; the loop also notes how many of this run's step records came before each request was added
(`added_at_step`), which is what replay needs to add it at the same step boundary.

(jaxllm.bench has the full harness: workloads, arrival processes, metrics. This is the minimal
loop the simulator's own experiments and tests need.)
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable

import numpy as np

from jaxllm.sampling_params import SamplingParams


@dataclasses.dataclass(frozen=True)
class TimedRequest:
    request_id: str
    arrival: float  # seconds after the run starts
    prompt_token_ids: tuple[int, ...]
    params: SamplingParams
    priority: int = 0


def poisson_arrivals(num_requests: int, rate: float, seed: int = 0) -> np.ndarray:
    """[num_requests] arrival offsets (s) of a Poisson process at `rate` requests/s, the first at 0;
    rate=math.inf puts them all at 0 (offline throughput)."""
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or math.isnan(rate) or rate <= 0:
        raise ValueError(f"request rate must be > 0 requests/s (math.inf: all at once), got {rate!r}")
    if not isinstance(num_requests, int) or num_requests < 0:
        raise ValueError(f"num_requests must be an int >= 0, got {num_requests!r}")
    if math.isinf(rate):
        return np.zeros(num_requests)
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, num_requests)
    return np.concatenate([[0.0], np.cumsum(gaps[1:])])[:num_requests]


def make_requests(prompt_lens, output_lens, arrivals, vocab_size: int = 512, seed: int = 0,
                  prefix: str = "r") -> list[TimedRequest]:
    """Requests with random prompt tokens of the given lengths, `ignore_eos` and max_tokens = the
    output length (so a real run and a simulation produce exactly the same number of tokens)."""
    if not len(prompt_lens) == len(output_lens) == len(arrivals):
        raise ValueError(f"prompt_lens, output_lens, arrivals differ in length: "
                         f"{len(prompt_lens)}, {len(output_lens)}, {len(arrivals)}")
    rng = np.random.default_rng(seed)
    return [
        TimedRequest(f"{prefix}{i}", float(a), tuple(int(t) for t in rng.integers(3, vocab_size, int(p))),
                     SamplingParams(max_tokens=int(o), ignore_eos=True, temperature=0.0))
        for i, (p, o, a) in enumerate(zip(prompt_lens, output_lens, arrivals))
    ]


@dataclasses.dataclass
class WorkloadRun:
    """What one run of run_workload recorded."""

    requests: list[dict]  # one row per request (see run_workload)
    steps: list  # StepStats records, in order
    start_time: float  # the clock when the run began (arrival offsets count from here)

    def requests_frame(self):
        import pandas as pd

        return pd.DataFrame(self.requests)

    def steps_frame(self):
        import pandas as pd

        return pd.DataFrame([dataclasses.asdict(s) for s in self.steps])


def _sleep_until(clock: Callable[[], float]) -> Callable[[float], None]:
    def wait(t: float) -> None:
        dt = t - clock()
        if dt > 0:
            time.sleep(dt)
    return wait


def run_workload(engine, requests: list[TimedRequest], wait: Callable[[float], None] | None = None) -> WorkloadRun:
    """Drive `engine` (Engine or SimulatedEngine) through `requests` on its own clock.

    wait(t): idle until clock time t; default `engine.advance_to` if it has one, else sleep.
    Per-request rows: request_id, arrival_time, added_at_step, add_index, prompt / output token ids and
    counts, first_scheduled_time, first_token_time, finished_time, ttft, e2e_latency,
    num_preemptions, num_cached_tokens, finish_reason.
    """
    clock = engine.clock
    wait = wait or getattr(engine, "advance_to", None) or _sleep_until(clock)
    pending = sorted(requests, key=lambda r: r.arrival)
    steps: list = []
    engine.add_step_observer(steps.append)
    added: dict[str, int] = {}
    rows: list[dict] = []
    i = 0
    base = engine.num_recorded_steps  # the engine may have run before: count this run's records
    t0 = clock()
    try:
        while i < len(pending) or engine.has_unfinished_requests():
            now = clock()
            while i < len(pending) and t0 + pending[i].arrival <= now:
                r = pending[i]
                engine.add_request(r.request_id, {"prompt_token_ids": list(r.prompt_token_ids)}, r.params,
                                   arrival_time=t0 + r.arrival, priority=r.priority)
                added[r.request_id] = (engine.num_recorded_steps - base, i)
                i += 1
            if engine.has_unfinished_requests():
                for out in engine.step():
                    if out.finished:
                        rows.append(_request_row(out, *added[out.request_id]))
            elif i < len(pending):
                wait(t0 + pending[i].arrival)
    finally:
        engine.remove_step_observer(steps.append)
    return WorkloadRun(rows, steps, t0)


def _request_row(out, added_at_step: int, add_index: int) -> dict:
    m = out.metrics
    c = out.outputs[0]
    return {
        "request_id": out.request_id,
        "arrival_time": m.arrival_time,
        "added_at_step": added_at_step,
        "add_index": add_index,  # order of add_request calls (the queue order of equal arrivals)
        "num_prompt_tokens": len(out.prompt_token_ids),
        "num_output_tokens": len(c.token_ids),
        "prompt_token_ids": list(out.prompt_token_ids),
        "output_token_ids": list(c.token_ids),
        "first_scheduled_time": m.first_scheduled_time,
        "first_token_time": m.first_token_time,
        "finished_time": m.finished_time,
        "ttft": m.ttft,
        "e2e_latency": m.e2e_latency,
        "num_preemptions": m.num_preemptions,
        "num_cached_tokens": m.num_cached_tokens,
        "finish_reason": c.finish_reason,
    }


def summarize(requests: list[dict]) -> dict:
    """Throughput over the run (first arrival to last finish) and TTFT mean / p50 / p90 (s)."""
    if not requests:
        raise ValueError("no finished requests to summarize")
    arrival = min(r["arrival_time"] for r in requests)
    duration = max(r["finished_time"] for r in requests) - arrival
    ttft = np.array([r["ttft"] for r in requests if r["ttft"] is not None])
    out_tokens = sum(r["num_output_tokens"] for r in requests)
    return {
        "num_requests": len(requests),
        "duration_s": duration,
        "requests_per_s": len(requests) / duration,
        "output_tokens_per_s": out_tokens / duration,
        "ttft_mean_s": float(ttft.mean()),
        "ttft_p50_s": float(np.percentile(ttft, 50)),
        "ttft_p90_s": float(np.percentile(ttft, 90)),
    }
