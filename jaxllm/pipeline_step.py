"""Engine.step under pipeline parallelism: one pipeline tick per engine step (vLLM V1's batch queue).

    plan   = scheduler.schedule(in_flight=queue.request_ids())   # never a request already in flight
    window = queue.advance(InFlight(plan, step) or a bubble)    # every batch one stage on
    runner.swap(plan.blocks_to_swap_out, plan.blocks_to_swap_in)  # every stage's blocks, one plan
    out    = runner.run_tick(window)                            # stage s runs window[s]
    done   = queue.complete()                                   # the batch that left stage P-1
    scheduler.update(done.plan, tokens)                         # its tokens, P ticks after scheduling

So the host schedules a new batch while up to P - 1 older ones are still in the pipeline, and a
request's next token is scheduled only once its previous one has come back (batches hold
disjoint requests). Aborting an in-flight request is deferred until its batch returns (its KV
blocks must stay its own until then). Host only: never imports jax.

Host/device overlap (ParallelConfig.pipeline_overlap_host): the tick is dispatched without
waiting (runner.dispatch_tick); the batch that left stage P-1 becomes the queue's `pending` one,
and the engine reads the *previous* tick's pending tokens only after dispatching this tick, so
the host's update, outputs, next schedule and batch preparation run while the devices compute.
A pending batch's requests stay unschedulable until read, so each request's token chain, and
hence every token, is the same; the price is one more batch in flight (P + 1 ticks per token
of a lone request instead of P).
"""

from __future__ import annotations

from jaxllm.core.batch_queue import InFlight, bubble_reason
from jaxllm.core.scheduler import SchedulerOutput


def pipeline_step(engine) -> list:
    from jaxllm.engine import _DeviceTiming

    start = engine.clock()
    kv, queue, scheduler = engine.kv_cache_manager, engine.batch_queue, engine.scheduler
    lookups_before = (kv.prefix_cache_queries, kv.prefix_cache_hits)
    plan = scheduler.schedule(in_flight=queue.request_ids())
    footprint = engine._kv_footprint()
    timing = _DeviceTiming(engine.clock, engine.runner)
    done, sampled, failed = None, {}, []
    overlap = engine.config.parallel.pipeline_overlap_host
    ticks = bool(plan.scheduled or queue.in_flight)
    if ticks or plan.has_swaps or queue.pending is not None:
        window = None
        if ticks:
            # Why stage 0 idles this tick if nothing was scheduled (batch_queue.py).
            reason = None if plan.scheduled else bubble_reason(scheduler, queue.request_ids(), queue.num_stages)
            # Outside the try: a broken invariant (a request in two in-flight batches) must raise.
            entry = InFlight(plan, engine.build_step_inputs(plan.scheduled)) if plan.scheduled else None
            window = queue.advance(entry, reason)
        try:
            with timing:
                # Before the tick, as in Engine.step: swap-outs read blocks this tick may reuse,
                # swap-ins land before stage 0 reads them. A victim is never in flight (the
                # scheduler preempts only requests outside the pipeline), so every stage has
                # written its blocks; a swapped-in request's later stages read them in later ticks.
                engine.runner.swap(plan.blocks_to_swap_out, plan.blocks_to_swap_in)
                device_out = engine.runner.dispatch_tick(window) if ticks else None
                done = queue.complete() if ticks else None
                if overlap:  # read the previous tick's batch; this tick's waits for the next step
                    done, device_out = queue.swap_pending(done, device_out)
                result = engine.runner.fetch_outputs(device_out)
            if done is not None:
                sampled = engine._apply_result(done.plan, done.step, result)
        except Exception as e:  # noqa: BLE001 - a failed tick must not take the engine down
            lost = queue.clear() + ([done] if done is not None else [])  # done: out of the queue
            every = [item for p in [plan] + [d.plan for d in lost] for item in p.scheduled]
            # The plan's copies ride along: _fail_step treats swapped content as suspect.
            failed = engine._fail_step(SchedulerOutput(
                scheduled=every, preempted=[], num_batched_tokens=0,
                blocks_to_swap_out=plan.blocks_to_swap_out, blocks_to_swap_in=plan.blocks_to_swap_in), e)
            # (_fail_step resets a lost KV cache and carry; a kept carry's rows of the dropped
            # batches are read only by the bubbles that follow them.)
            done = None
    now = engine.clock()
    applied = done.plan if done is not None else SchedulerOutput(scheduled=[], preempted=[], num_batched_tokens=0)
    finished = scheduler.update(applied, sampled, now=now) + failed
    engine.num_steps += bool(plan.scheduled)
    outputs, num_finished = engine._make_outputs(applied, sampled, finished)
    for rid in [r for r in queue.deferred_aborts if not engine._in_flight(r)]:
        queue.deferred_aborts.remove(rid)
        engine.abort_request(rid)
    if plan.scheduled or plan.preempted or plan.has_swaps or applied.scheduled:
        lookups = (kv.prefix_cache_queries - lookups_before[0], kv.prefix_cache_hits - lookups_before[1])
        engine._notify_observers(plan, start, now, num_finished, footprint, lookups, timing)
    return list({out.request_id: out for out in outputs}.values())
