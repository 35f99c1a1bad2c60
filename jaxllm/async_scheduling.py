"""Engine.step with async scheduling (EngineConfig.async_scheduling, vLLM's): the host schedules
and prepares step N+1 while the device runs step N. Host only: never imports jax.

One call (overlapped):
    plan   = scheduler.schedule()                 # N's rows counted done, N's tokens placeholders
    step   = build_step_inputs(plan, N's rows)    # a row fed N's token gets take_index, not an id
    out    = runner.dispatch(step)                # queued behind N; takes N's tokens on device
    scheduler.mark_in_flight(plan)
    tokens = runner.fetch(N)                      # the only wait
    scheduler.update(N, tokens, in_flight=True)   # append, check stops; drop what N+1 wasted
    outputs of N                                  # detokenize while N+1 runs
so every engine.step() returns the outputs of the step dispatched by the call before it.

A call runs synchronously (fetch N, update, then schedule) when the next schedule or its inputs
need the host to know N's tokens: a request of N needs them (`needs_host_tokens`: logprobs,
prompt logprobs, penalties' history, stop strings, n > 1 samples and beams, hidden states and
interventions), the scheduler could preempt (a victim's blocks would be those of a step on the
device), or a swapped request waits (its swap-in). Batch-invariant engines never overlap. Each
request's tokens are those of a synchronous engine: the same rows, the same inputs, only the
moment the host learns them moves; a request that stopped at N loses its row of N+1 (scheduler
module docstring).
"""

from __future__ import annotations

import dataclasses

from jaxllm.core.scheduler import SchedulerOutput
from jaxllm.request import RequestStatus


def needs_host_tokens(params, is_sample_of_many: bool) -> bool:
    """Whether a request's next step needs its previous tokens on the host (module docstring)."""
    return bool(
        params.logprobs is not None or params.prompt_logprobs is not None or params.has_penalties
        or params.stop or is_sample_of_many or params.output_hidden_states or params.residual_interventions
    )


@dataclasses.dataclass
class InFlightStep:
    """A dispatched step whose outputs the host has not read."""

    plan: SchedulerOutput
    step: object  # StepInputs
    outputs: object  # the runner's device StepOutputs
    rows: dict[str, int]  # request_id -> batch row, for the rows that sample (the next take_index)
    needs_host_tokens: bool  # some request of it needs its tokens before its next schedule


class _Timing:
    """One call's timing: device calls (dispatch, swaps, the wait in fetch) through the engine's
    _DeviceTiming, the wait in fetch alone, and the host seconds spent while no dispatched step
    was outstanding (the host work async scheduling did not overlap with the device)."""

    def __init__(self, engine, in_flight: bool):
        from jaxllm.engine import _DeviceTiming

        self.clock = engine.clock
        self.device = _DeviceTiming(engine.clock, engine.runner)
        self.fetch_wait = 0.0
        self.idle_host = 0.0
        self._idle_since = None if in_flight else self.clock()
        self._idle_device = 0.0
        self.scheduled_in_flight = False  # this call scheduled while a step was on the device

    def in_flight(self, busy: bool) -> None:
        """Mark whether a dispatched step is outstanding from now on."""
        now = self.clock()
        if self._idle_since is not None and busy:
            self.idle_host += (now - self._idle_since) - (self.device.seconds - self._idle_device)
            self._idle_since = None
        elif self._idle_since is None and not busy:
            self._idle_since, self._idle_device = now, self.device.seconds


class _Call:
    """One async engine.step(): what it completed and what it reports."""

    def __init__(self, engine, prev: InFlightStep | None):
        self.engine = engine
        self.timing = _Timing(engine, prev is not None)
        self.outputs: list = []
        self.num_finished = 0
        self.completed = 0  # steps whose tokens this call applied

    def complete(self, done: InFlightStep, behind: InFlightStep | None = None) -> bool:
        """Fetch a dispatched step and apply its tokens. `behind`: the step dispatched after it,
        still outstanding. A failed fetch fails both steps' requests; returns False then."""
        engine, timing = self.engine, self.timing
        try:
            with timing.device:
                t0 = engine.clock()
                result = engine.runner.fetch(done.outputs)
                timing.fetch_wait += engine.clock() - t0
            sampled = engine._apply_result(done.plan, done.step, result)
        except Exception as e:  # noqa: BLE001 - as Engine.step: a failed step ends its requests only
            timing.in_flight(False)
            self.fail([done.plan] + ([behind.plan] if behind is not None else []), e)
            return False
        timing.in_flight(behind is not None)
        self.completed += 1
        finished = engine.scheduler.update(done.plan, sampled, now=engine.clock(), in_flight=True)
        self.report(done.plan, sampled, finished)
        return True

    def fail(self, plans: list[SchedulerOutput], error: Exception) -> None:
        """Engine._fail_step over every running row of `plans` (steps lost together)."""
        seen, items = set(), []
        for p in plans:
            for item in p.scheduled:
                if item.request_id not in seen and item.request.status == RequestStatus.RUNNING:
                    seen.add(item.request_id)
                    items.append(item)
        first = plans[0]
        failed = self.engine._fail_step(SchedulerOutput(
            scheduled=items, preempted=[], num_batched_tokens=0,
            blocks_to_swap_out=first.blocks_to_swap_out, blocks_to_swap_in=first.blocks_to_swap_in), error)
        self.report(SchedulerOutput([], [], 0), {}, failed)

    def report(self, plan, sampled: dict, finished: list) -> None:
        outputs, n = self.engine._make_outputs(plan, sampled, finished)
        self.outputs += outputs
        self.num_finished += n


def async_step(engine) -> list:
    start = engine.clock()
    kv, scheduler = engine.kv_cache_manager, engine.scheduler
    lookups_before = (kv.prefix_cache_queries, kv.prefix_cache_hits)
    prev, engine._in_flight_step = engine._in_flight_step, None
    call = _Call(engine, prev)
    if prev is not None and (prev.needs_host_tokens or scheduler.could_preempt() or scheduler.has_swapped_waiting()):
        engine.num_async_sync_steps += 1
        call.complete(prev)
        prev = None
    call.timing.scheduled_in_flight = prev is not None
    plan = scheduler.schedule()
    footprint = engine._kv_footprint()
    # A victim or a swap never meets a step on the device (the checks above keep them apart).
    assert prev is None or not (plan.preempted or plan.has_swaps), "async step planned a preemption or swap"
    engine.num_steps += bool(plan.scheduled)
    new = None
    if plan.scheduled or plan.has_swaps:
        try:
            with call.timing.device:
                engine.runner.swap(plan.blocks_to_swap_out, plan.blocks_to_swap_in)
            if plan.scheduled:
                new = _dispatch(engine, plan, prev, call.timing)
        except Exception as e:  # noqa: BLE001 - a failed step must not take the engine down
            call.fail([plan] + ([prev.plan] if prev is not None else []), e)
            prev = None
    if prev is not None and not call.complete(prev, behind=new):
        new = None  # dispatched behind a failed step: failed with it
    if new is not None and not scheduler.has_unfinished_requests():
        # Only rows a stop made useless are left: read them now, so an idle engine holds nothing.
        call.complete(new)
        new = None
    engine._in_flight_step = new
    # Requests this schedule finished (cannot fit) when no update ran after it.
    call.report(SchedulerOutput([], [], 0), {}, scheduler.update(SchedulerOutput([], [], 0), {}))
    call.timing.in_flight(True)  # closes an idle stretch
    if plan.scheduled or plan.preempted or plan.has_swaps or call.completed:
        lookups = (kv.prefix_cache_queries - lookups_before[0], kv.prefix_cache_hits - lookups_before[1])
        engine._notify_observers(plan, start, engine.clock(), call.num_finished, footprint, lookups,
                                 call.timing.device, call.timing)
    return list({out.request_id: out for out in call.outputs}.values())


def _dispatch(engine, plan, prev: InFlightStep | None, timing: _Timing) -> InFlightStep:
    step = engine.build_step_inputs(plan.scheduled, in_flight_rows=prev.rows if prev is not None else {})
    timing.in_flight(True)
    with timing.device:
        outputs = engine.runner.dispatch(step)
    engine.scheduler.mark_in_flight(plan)
    # The count tests read: step N+1 was scheduled and dispatched before N's tokens were fetched.
    engine.num_async_overlapped_steps += prev is not None
    sync_ids = engine._host_token_ids
    return InFlightStep(
        plan, step, outputs,
        rows={item.request_id: i for i, item in enumerate(plan.scheduled) if item.samples},
        needs_host_tokens=bool(sync_ids) and any(item.request_id in sync_ids for item in plan.scheduled),
    )
