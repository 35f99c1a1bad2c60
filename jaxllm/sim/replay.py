"""Replay a recorded run through the simulator: same arrivals at the same step boundaries, same
tokens, hence the same scheduling decisions (it is the same scheduler code). Host only.

    result = replay(run.requests, run.steps, engine_config, model="path/to/hf_dir")
    assert result.matches, result.mismatches[:3]
    result.steps          # the simulator's StepStats, one per recorded step

Each request is added before the step it was added before in the recorded run: its
`added_at_step` (the number of step records made before it was added, as jaxllm.bench.TimedDriver records
it) or, without that column, the first recorded step whose start_time is at or after its
arrival_time; requests are added in `add_index` order (else by arrival_time). The clock is pinned to each recorded step's start_time before the step, so
time-dependent policies see the times the real run saw. Each request "samples" its recorded
output tokens (`output_token_ids`, or stand-ins when only `num_output_tokens` is known) with
max_tokens = its recorded output length, so it ends in the same step. With a cost model, the
replayed steps carry its predicted device / host times: a per-step check of the cost model.

Not replayed: aborts, n > 1 parents (replay their samples as separate requests), stop strings
(ending at the recorded length is equivalent).
"""

from __future__ import annotations

import bisect
import dataclasses
from typing import Any

from jaxllm.config import EngineConfig
from jaxllm.sampling_params import SamplingParams
from jaxllm.sim.clock import VirtualClock
from jaxllm.sim.cost_model import LinearCostModel, _records
from jaxllm.sim.engine import SimulatedEngine


@dataclasses.dataclass
class ReplayResult:
    steps: list  # the simulator's StepStats
    recorded: list[dict]  # the recorded steps (dicts)
    mismatches: list[str]  # one line per step whose decisions differ (empty: identical)

    @property
    def matches(self) -> bool:
        return not self.mismatches


def replay(requests, steps, config: EngineConfig, model: Any = None, cost_model: Any = None,
           swap_available: bool = True) -> ReplayResult:
    """Replay recorded per-request rows and per-step records (lists of dicts / StepStats or pandas
    DataFrames) on a SimulatedEngine built like the recorded engine. cost_model: None takes no
    time per step (decisions only); any SimulatedEngine cost model gives predicted step times."""
    recorded = _records(steps)
    # Add order: equal arrivals join the queue in the order they were added.
    reqs = sorted(_records(requests), key=lambda r: (r.get("add_index", 0), r["arrival_time"]))
    if not recorded:
        raise ValueError("replay needs at least one recorded step")
    starts = [float(s["start_time"]) for s in recorded]
    sim = SimulatedEngine(config, model, cost_model if cost_model is not None else LinearCostModel.zeros(),
                          clock=VirtualClock(starts[0]), swap_available=swap_available)
    by_step: dict[int, list[dict]] = {}
    for r in reqs:
        k = r.get("added_at_step")
        k = int(k) if k is not None else bisect.bisect_left(starts, float(r["arrival_time"]))
        by_step.setdefault(k, []).append(r)
    out: list = []
    sim.add_step_observer(out.append)
    for k, start in enumerate(starts):
        for r in by_step.pop(k, []):
            _add(sim, r)
        sim.clock.reset_to(start)
        while len(out) <= k and sim.has_unfinished_requests():
            sim.step()
        if len(out) <= k:
            break
    leftover = sorted(r["request_id"] for rs in by_step.values() for r in rs)
    mismatches = _compare(out, recorded)
    if leftover:
        mismatches.append(f"requests added after the last replayed step: {leftover[:5]}")
    return ReplayResult(out, recorded, mismatches)


def _add(sim: SimulatedEngine, r: dict) -> None:
    tokens = r.get("output_token_ids")
    tokens = list(tokens) if tokens is not None and len(tokens) else None
    num_out = len(tokens) if tokens is not None else int(r["num_output_tokens"])
    params = SamplingParams(max_tokens=num_out, ignore_eos=True, temperature=0.0)
    sim.add_request(str(r["request_id"]), {"prompt_token_ids": list(r["prompt_token_ids"])}, params,
                    arrival_time=float(r["arrival_time"]), priority=int(r.get("priority", 0) or 0),
                    cache_salt=r.get("cache_salt"), output_token_ids=tokens)


def _compare(sim_steps: list, recorded: list[dict]) -> list[str]:
    lines = []
    if len(sim_steps) != len(recorded):
        lines.append(f"{len(sim_steps)} replayed steps vs {len(recorded)} recorded")
    for k, (s, r) in enumerate(zip(sim_steps, recorded)):
        sched = tuple((str(i), int(n)) for i, n in r["scheduled"])
        pre = tuple(str(i) for i in r["preempted"])
        diffs = []
        if s.scheduled != sched:
            diffs.append(f"scheduled {s.scheduled} vs recorded {sched}")
        if s.preempted != pre or s.num_preempted_swap != int(r["num_preempted_swap"]):
            diffs.append(f"preempted {s.preempted} ({s.num_preempted_swap} swapped) vs recorded {pre} "
                         f"({r['num_preempted_swap']} swapped)")
        if diffs:
            lines.append(f"step {k}: " + "; ".join(diffs))
    return lines
