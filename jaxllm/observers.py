"""Step records pushed to observers: how experiments watch the engine without patching it.
Host only: never imports jax.

    records = []
    llm.engine.add_step_observer(records.append)
    ...
    df = pandas.DataFrame([dataclasses.asdict(r) for r in records])

Per-request timings live in each request's `RequestMetrics` (jaxllm/request.py): arrival, first
scheduled, first token, every token's time, finish, preemptions, cached tokens.
"""

from __future__ import annotations

import dataclasses
from typing import Callable


@dataclasses.dataclass(frozen=True)
class StepStats:
    """One engine step that ran a batch (a read-only snapshot taken at the end of the step).

    Times are seconds in the engine's clock (`Engine.clock`, time.monotonic by default).
    """

    step: int  # index of this step among the engine's steps that ran a batch
    start_time: float  # when the step began (before scheduling)
    time: float  # when its tokens were sampled: the timestamp of the tokens it produced
    end_time: float  # when the step returned its outputs (after detokenization)

    # The batch. A row is "decode" when it feeds one sampled output token (num_new_tokens == 1 and
    # its prompt is computed); every other row is "prefill": a prompt chunk, or tokens recomputed
    # after a preemption.
    num_scheduled_requests: int  # requests in the batch
    num_prefill_requests: int
    num_decode_requests: int
    num_batched_tokens: int  # real (unpadded) tokens in the batch
    num_prefill_tokens: int
    num_decode_tokens: int
    num_padded_tokens: int  # the token bucket the batch ran in (derived from the plan)
    num_context_tokens: int  # sum over rows of the tokens attended to (cached + new): attention's work
    scheduled: tuple[tuple[str, int], ...]  # (request_id, num_new_tokens) in batch order

    # Queues and preemption.
    num_running: int  # after the step
    num_waiting: int  # after the step
    num_preempted: int  # requests preempted while scheduling this step (both modes)
    num_preempted_recompute: int
    num_preempted_swap: int
    preempted: tuple[str, ...]  # their ids, in preemption order
    num_blocks_swapped_out: int  # block copies this step ran before its forward
    num_blocks_swapped_in: int
    num_finished: int  # requests that finished in this step (stops, length, errors)

    # KV blocks while the step ran (after scheduling, before the requests that finished in it
    # freed theirs): the step's memory footprint.
    kv_blocks_used: int  # blocks held by at least one request
    # The same, counting a block once per request holding it: what the requests would hold
    # without sharing. 1 - kv_blocks_used / kv_blocks_referenced is the PagedAttention paper's
    # memory saving from sharing (prefix cache, n > 1 samples, beams).
    kv_blocks_referenced: int
    kv_blocks_free: int  # blocks no request holds (some may still hold cached content)
    kv_blocks_cached: int  # blocks findable by hash in the prefix cache (held or free)
    num_kv_blocks: int  # usable blocks in the cache (the sink block excluded)
    # Prefix cache, over this step's admissions: prompt tokens looked up, tokens found cached.
    prefix_cache_queries: int
    prefix_cache_hits: int

    # Where the time went. device_time: the block copies and the jitted step, from dispatch until
    # its outputs were on the host (compilation included, and also reported alone); host_time: the
    # rest of the step (scheduling, building inputs, updating requests, detokenizing).
    host_time: float
    device_time: float
    compile_time: float  # XLA compilation during this step (0 in steady state)

    # Per scheduled row (batch order, as `scheduled`): tokens already in its KV cache before this
    # step. With `scheduled`'s num_new_tokens this gives each row's attention context (what a
    # step-cost model needs: attention's work is per row, not per batch). Empty in records made
    # before the field existed.
    row_num_computed_tokens: tuple[int, ...] = ()

    # Async scheduling (EngineConfig.async_scheduling; 0 / False otherwise). A record is one
    # engine.step(): the plan it scheduled and dispatched, and the outputs of the step before,
    # which it fetched (num_finished, time). device_time is then the dispatch, the copies and the
    # wait in fetch (fetch_wait_time). Dispatch can wait too: on CPU a step waits there for the
    # step before it, whose donated KV cache it takes. host_time_overlapped is the part of
    # host_time spent while a dispatched step was outstanding: hidden behind the device as long as
    # the device stayed busy through it, i.e. when the call's next device wait was > 0.
    host_time_overlapped: float = 0.0
    fetch_wait_time: float = 0.0  # part of device_time: blocked reading a step's outputs
    scheduled_in_flight: bool = False  # this plan was scheduled before the previous step's tokens came


StepObserver = Callable[[StepStats], None]
