"""Scheduler: the mechanism that spends each step's token budget. Host only (no jax).

No prefill or decode phases (vLLM v1): every request has `num_computed_tokens` and each step gets
`num_new_tokens` to catch up with `num_tokens` (prompt + outputs). A long prompt taking several
steps is chunked prefill; prefills and decodes share a batch; a preempted request resumes by
recomputing all its tokens through the same path.

One step:
  1. Running requests, in admission order, each get min(remaining, budget) tokens (only whole
     remainders when chunked prefill is off). Slots are allocated for
     num_computed_tokens + num_new_tokens tokens; the newest sampled token is not in the cache yet
     (its K/V is written when it is fed), so a decoding request needs at most one new block.
     If blocks run out, the policy picks a victim among the running requests (possibly the
     requester, possibly one already scheduled this step, which is then unscheduled and its budget
     refunded). A victim is preempted in the mode `policy.preemption_mode(victim)` names, or the
     scheduler's `preemption_mode`:
       recompute: blocks freed (their full blocks stay in the prefix cache, so a resumed request
         may hit its own blocks), num_computed_tokens = 0, status PREEMPTED;
       swap: its computed blocks are planned for copying to the host pool (`blocks_to_swap_out`)
         and its device blocks freed as above; num_computed_tokens stays, status SWAPPED. With
         the host pool full it is recomputed instead (counted in num_swap_fallbacks).
     Either way it goes to the front of the waiting queue. Once no more preemption can happen,
     the scheduled requests' newly full blocks are offered to the prefix cache.
  2. If nothing was preempted this step (a step that preempted has no room to admit; admitting would
     just thrash), waiting requests are admitted in policy order while seats (max_num_seqs), budget
     and blocks allow. An admitted request first takes the longest run of cached full blocks of its
     tokens (prefix caching; it may hit blocks scheduled earlier in this same step, since the step
     writes K/V before attention reads it) and num_computed_tokens starts past them.
     Head-of-line: admission stops at the first request that does not fit the budget or the free
     blocks, as in vLLM, so a large request is not starved by a stream of small ones; a request
     the policy refuses (`can_admit` False) is skipped instead.
     A SWAPPED request is admitted like any other, in policy order, but it looks nothing up: it
     needs device blocks for all its swapped blocks plus its new tokens (or it waits, head-of-line),
     and the copies back are planned (`blocks_to_swap_in`).
  3. The engine runs the batch and calls `update` with the sampled tokens: num_computed_tokens
     advances, tokens are appended, stops are checked, finished requests free their blocks.

Async scheduling (EngineConfig.async_scheduling, jaxllm/async_scheduling.py): the engine calls
`mark_in_flight(plan)` once the step is dispatched, which advances num_computed_tokens at once and
counts each sampling row's token as a placeholder (`num_output_placeholders`), so the next
`schedule` runs before the tokens come back: a request whose token is in flight gets a one-token
row (the device feeds it the sampled id), except one that the in-flight token brings to
max_tokens / max_model_len. `update(plan, tokens, in_flight=True)` then appends the real tokens
and checks stops; a request that stopped (EOS, stop id) while a later step already holds a row
for it finishes as if that row had never been scheduled: the row's placeholder and its token are
dropped and num_computed_tokens rolls back before its blocks are freed. The engine runs a step
synchronously (update first) when `could_preempt()` or a swapped request waits: a victim's or a
swap's blocks must not be those of a step still on the device.

Copy order within a step: the engine runs the swap-outs, then the swap-ins, then the forward.
Swap-outs read device blocks that this step may already have handed to another request, so they
go before anything writes; swap-ins must land before the forward reads. A step that swaps out
preempted, so it admits nobody and swaps nothing in: a host block freed by a swap-in is never a
swap-out's destination in the same step.

Capacity: a request is rejected by `add_request` if its prompt alone cannot fit the KV cache, the
per-sequence block limit or max_model_len. A request whose own tokens need more blocks than the
whole cache holds is finished with "length" (the cache is then its effective max length). Its own
need, not the blocks in use, decides this: with prefix caching one block may have several owners.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from typing import Callable

from jaxllm.core.kv_cache.manager import ComputedBlocks, KVCacheManager, cdiv
from jaxllm.core.policies import SchedulingPolicy, get_policy
from jaxllm.request import Request, RequestStatus


@dataclasses.dataclass
class ScheduledRequest:
    """One request's share of a step: tokens [num_computed_tokens, num_computed_tokens + num_new_tokens)."""

    request: Request
    num_new_tokens: int
    samples: bool  # this step reaches num_tokens, so its last logits produce a new token
    num_computed_tokens: int = -1  # snapshot at schedule time (filled in from the request)

    def __post_init__(self) -> None:
        if self.num_computed_tokens < 0:
            self.num_computed_tokens = self.request.num_computed_tokens

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def token_ids(self) -> list[int]:
        """The num_new_tokens token ids fed this step (positions num_computed_tokens onwards)."""
        start = self.num_computed_tokens
        return self.request.token_slice(start, start + self.num_new_tokens)


@dataclasses.dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest]  # batch order: continuing running requests, then newly admitted
    preempted: list[Request]  # preempted in this step (now waiting, blocks freed; some SWAPPED)
    num_batched_tokens: int  # sum of num_new_tokens
    # finished during scheduling (cache capacity reached / cannot ever fit); update() returns them too
    finished: list[Request] = dataclasses.field(default_factory=list)
    # Copies the runner makes before the forward, in this order (vLLM v0's names):
    blocks_to_swap_out: list[tuple[int, int]] = dataclasses.field(default_factory=list)  # (device, host)
    blocks_to_swap_in: list[tuple[int, int]] = dataclasses.field(default_factory=list)  # (host, device)

    @property
    def has_swaps(self) -> bool:
        return bool(self.blocks_to_swap_out or self.blocks_to_swap_in)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    """Continuous batching with chunked prefill and recompute preemption.

    Args:
      kv_cache_manager: owns the KV blocks, the prefix cache and the block_table rows.
      policy: a SchedulingPolicy, or a name for `get_policy` ("fcfs", "priority", "sjf", "static").
      max_num_seqs: max running requests (seats); <= kv_cache_manager.max_num_seqs.
      max_num_batched_tokens: max sum of num_new_tokens per step.
      max_model_len: max prompt + output tokens of a request.
      enable_chunked_prefill: if False, a request is only scheduled for all its remaining tokens,
        which needs max_num_batched_tokens >= max_model_len.
      clock: time source for the request timings (seconds).
      preemption_mode: "recompute" or "swap" (needs the manager's host pool; without one, every
        swap falls back to recompute); a policy may choose per victim.
    """

    def __init__(
        self,
        kv_cache_manager: KVCacheManager,
        policy: SchedulingPolicy | str | None,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_model_len: int,
        enable_chunked_prefill: bool = True,
        clock: Callable[[], float] = time.monotonic,
        preemption_mode: str = "recompute",
    ):
        if max_num_seqs < 1 or max_num_batched_tokens < 1 or max_model_len < 1:
            raise ValueError(
                f"max_num_seqs, max_num_batched_tokens, max_model_len must be >= 1, got "
                f"{max_num_seqs}, {max_num_batched_tokens}, {max_model_len}"
            )
        if max_num_seqs > kv_cache_manager.max_num_seqs:
            raise ValueError(
                f"max_num_seqs={max_num_seqs} exceeds the KV-cache manager's {kv_cache_manager.max_num_seqs} table rows"
            )
        if max_model_len > kv_cache_manager.max_tokens_per_seq():
            raise ValueError(
                f"max_model_len={max_model_len} exceeds max_blocks_per_seq * block_size = "
                f"{kv_cache_manager.max_tokens_per_seq()}"
            )
        _check_preemption_mode(preemption_mode, "preemption_mode")
        if not enable_chunked_prefill and max_num_batched_tokens < max_model_len:
            raise ValueError(
                f"without chunked prefill max_num_batched_tokens ({max_num_batched_tokens}) must be >= "
                f"max_model_len ({max_model_len}), or long prompts could never be scheduled"
            )
        self.kv_cache_manager = kv_cache_manager
        self.policy = get_policy(policy)
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.enable_chunked_prefill = enable_chunked_prefill
        self.clock = clock
        self.preemption_mode = preemption_mode

        self.requests: dict[str, Request] = {}  # unfinished requests by id
        self.waiting: collections.deque[Request] = collections.deque()  # preempted at the front
        self.running: list[Request] = []  # admission order
        self._num_preemptions = 0
        self._finished_in_schedule: list[Request] = []  # handed back by the next update()
        self._swap_out_plan: list[tuple[int, int]] = []  # this step's, filled by _preempt
        # Swap counters (get_stats): requests swapped out / in, their blocks, swaps that recomputed
        # because the host pool was full.
        self.num_swap_outs = self.num_swap_ins = 0
        self.num_blocks_swapped_out = self.num_blocks_swapped_in = 0
        self.num_swap_fallbacks = 0

    # -- queries --
    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_preemptions(self) -> int:
        """Total preemptions since construction."""
        return self._num_preemptions

    def has_unfinished_requests(self) -> bool:
        return bool(self.running or self.waiting)

    def get_request(self, request_id: str) -> Request | None:
        return self.requests.get(request_id)

    # -- requests in and out --
    def add_request(self, request: Request) -> None:
        """Queue a new request (status WAITING). ValueError if it can never be served."""
        rid = request.request_id
        if rid in self.requests:
            raise ValueError(f"request id {rid!r} is already in the scheduler")
        n = request.num_tokens
        if request.num_prompt_tokens == 0:
            raise ValueError(f"request {rid!r} has an empty prompt")
        if n > self.max_model_len:
            raise ValueError(f"request {rid!r}: prompt of {n} tokens exceeds max_model_len={self.max_model_len}")
        kv = self.kv_cache_manager
        if cdiv(n, kv.block_size) > kv.num_usable_blocks:
            raise ValueError(
                f"request {rid!r}: prompt of {n} tokens needs {cdiv(n, kv.block_size)} blocks, but the KV "
                f"cache has only {kv.num_usable_blocks}"
            )
        request.status = RequestStatus.WAITING
        self.requests[rid] = request
        self.waiting.append(request)

    def finish_request(
        self,
        request_id: str,
        status: RequestStatus,
        reason: str | None = None,
        stop_reason: int | str | None = None,
        error: str | None = None,
        now: float | None = None,
    ) -> Request | None:
        """End an unfinished request (engine: stop strings, errors, aborts) and free its blocks.

        `reason` defaults to the status's finish_reason. Returns the request, or None if it is
        unknown or already finished. Other requests are not disturbed.
        """
        if not status.is_finished:
            raise ValueError(f"finish_request needs a FINISHED_* status, got {status}")
        request = self.requests.get(request_id)
        if request is None:
            return None
        if request.status == RequestStatus.RUNNING:
            self.running.remove(request)
        else:
            self.waiting.remove(request)
        self._finish(request, status, reason, stop_reason, error, self.clock() if now is None else now)
        return request

    def abort_request(self, request_id: str) -> Request | None:
        """Abort an unfinished request (status FINISHED_ABORTED, reason "abort"); None if unknown."""
        return self.finish_request(request_id, RequestStatus.FINISHED_ABORTED)

    def _finish(self, request, status, reason, stop_reason, error, now) -> None:
        _drop_placeholders(request)
        request.status = status
        request.finish_reason = reason if reason is not None else status.finish_reason
        request.stop_reason = stop_reason
        if error is not None:
            request.error = error
        request.finished_time = now
        self.kv_cache_manager.free(request)
        del self.requests[request.request_id]

    def _preempt(self, request: Request, mode: str | None = None) -> None:
        """Preempt in `mode` (default: the policy's choice, else the scheduler's): swap its
        blocks out, or drop them (recompute); either way wait at the front of the queue."""
        self.running.remove(request)
        _drop_placeholders(request)
        if mode is None:
            mode = self.policy.preemption_mode(request) or self.preemption_mode
            _check_preemption_mode(mode, f"{self.policy!r}.preemption_mode")
        plan = self.kv_cache_manager.swap_out(request) if mode == "swap" else None
        if plan is not None:
            self._swap_out_plan.extend(plan)
            self.num_swap_outs += 1
            self.num_blocks_swapped_out += len(plan)
            request.status = RequestStatus.SWAPPED
        else:
            self.num_swap_fallbacks += mode == "swap" and request.num_computed_tokens > 0
            self.kv_cache_manager.free(request)  # before num_computed_tokens is reset: it uses it
            request.status = RequestStatus.PREEMPTED
            request.num_computed_tokens = 0
        request.num_preemptions += 1
        request.metrics.num_preemptions = request.num_preemptions
        self._num_preemptions += 1
        self.waiting.appendleft(request)

    def preempt_all_running(self) -> None:
        """Preempt (recompute) every running request, and make swapped ones recompute too: the
        engine lost the KV cache's (and the host pool's) contents."""
        for request in self.waiting:
            if request.status == RequestStatus.SWAPPED:
                self.kv_cache_manager.free(request)
                request.status = RequestStatus.PREEMPTED
                request.num_computed_tokens = 0
        # Newest first: each goes to the front of the queue, so the oldest ends up first again.
        for request in reversed(list(self.running)):
            self._preempt(request, "recompute")

    # -- one step --
    def schedule(self, in_flight: frozenset = frozenset()) -> SchedulerOutput:
        """Choose this step's batch. See the module docstring for the rules.

        in_flight: ids of requests whose last scheduled batch is still in a pipeline
        (core/batch_queue.py). They are neither scheduled nor chosen as preemption victims.
        """
        now = self.clock()
        kv = self.kv_cache_manager
        budget = self.max_num_batched_tokens
        scheduled: list[ScheduledRequest] = []
        preempted: list[Request] = []
        finished: list[Request] = []
        self._swap_out_plan = swap_out = []
        swap_in: list[tuple[int, int]] = []

        # 1. running requests, oldest admission first
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            num_computed = req.num_computed_tokens
            num_output = len(req.output_token_ids) + req.num_output_placeholders
            remaining = len(req.prompt_token_ids) + num_output - num_computed  # num_tokens, inlined: hot
            num_new = min(remaining, budget)
            if (num_new <= 0 or (num_new < remaining and not self.enable_chunked_prefill) or req.request_id in in_flight
                    or (req.num_output_placeholders and self._reaches_length(req, num_output))):
                i += 1
                continue
            while not kv.allocate_slots(req, num_new):
                if self._can_never_fit(req):
                    # By the add_request check this only happens while decoding past the cache's
                    # capacity; preempting others would not help.
                    self.running.remove(req)
                    self._finish(req, RequestStatus.FINISHED_LENGTH, None, None, None, now)
                    finished.append(req)
                    break
                # Never an in-flight request (its batch would write into freed blocks); req
                # itself is always a candidate.
                candidates = [r for r in self.running if r.request_id not in in_flight]
                victim = self.policy.choose_victim(candidates)
                if not any(victim is r for r in candidates):
                    raise ValueError(f"{self.policy!r}.choose_victim returned {victim!r}, not a running request")
                vi = next(k for k, r in enumerate(self.running) if r is victim)
                for k, item in enumerate(scheduled):
                    if item.request is victim:  # already scheduled this step: unschedule, refund
                        budget += item.num_new_tokens
                        del scheduled[k]
                        break
                self._preempt(victim)
                preempted.append(victim)
                if vi < i:
                    i -= 1
                if victim is req:
                    break
            else:
                scheduled.append(ScheduledRequest(req, num_new, num_new == remaining, num_computed))
                budget -= num_new
                i += 1
        # Preemption is over for this step, so these blocks will be computed: admissions below
        # may hit them.
        for item in scheduled:
            kv.cache_blocks(item.request, item.num_computed_tokens + item.num_new_tokens)

        # 2. admission
        if not preempted:
            running_view = list(self.running)  # one copy per step: policies must not mutate it
            self.policy.begin_admission(list(running_view), now)
            for req in self.policy.order_waiting(list(self.waiting), now):
                if len(self.running) >= self.max_num_seqs or budget <= 0:
                    break
                if not self.policy.can_admit(req, running_view):
                    continue  # the policy's veto on this request; others may still join
                swapped = req.status == RequestStatus.SWAPPED
                computed = ComputedBlocks() if swapped else kv.get_computed_blocks(req)
                remaining = req.num_tokens - req.num_computed_tokens - computed.num_tokens
                num_new = min(remaining, budget)
                if num_new < remaining and not self.enable_chunked_prefill:
                    break  # head-of-line: wait for budget rather than be overtaken
                plan = kv.swap_in(req, num_new) if swapped else None
                if plan is not None:
                    swap_in.extend(plan)
                    self.num_swap_ins += 1
                    self.num_blocks_swapped_in += len(plan)
                elif swapped or not kv.allocate_slots(req, num_new, computed):
                    if self._can_never_fit(req):
                        # Only a request preempted with as many tokens as the cache holds gets
                        # here (add_request refuses such prompts); never let it block the queue.
                        self.waiting.remove(req)
                        if req.num_output_tokens:
                            self._finish(req, RequestStatus.FINISHED_LENGTH, None, None, None, now)
                        else:
                            self._finish(req, RequestStatus.FINISHED_ERROR, None, None,
                                         "request does not fit in the KV cache", now)
                        finished.append(req)
                        continue
                    break  # head-of-line: wait for blocks
                self.waiting.remove(req)
                req.status = RequestStatus.RUNNING
                req.num_computed_tokens += computed.num_tokens
                if req.num_cached_tokens < 0:
                    req.num_cached_tokens = req.metrics.num_cached_tokens = computed.num_tokens
                if req.first_scheduled_time is None:
                    req.first_scheduled_time = now
                kv.cache_blocks(req, req.num_computed_tokens + num_new)
                self.running.append(req)
                running_view.append(req)
                scheduled.append(ScheduledRequest(req, num_new, num_new == remaining))
                budget -= num_new

        # The batch queue's invariant: a request is in at most one in-flight batch.
        assert not in_flight.intersection(item.request_id for item in scheduled), "scheduled an in-flight request"
        self._finished_in_schedule.extend(finished)
        return SchedulerOutput(
            scheduled=scheduled,
            preempted=preempted,
            num_batched_tokens=self.max_num_batched_tokens - budget,
            finished=finished,
            blocks_to_swap_out=swap_out,
            blocks_to_swap_in=swap_in,
        )

    def _reaches_length(self, req: Request, num_output: int) -> bool:
        """Whether `num_output` output tokens end the request by max_tokens or max_model_len
        (async scheduling: its in-flight token is its last, so it gets no further row)."""
        max_tokens = req.stop_checks[3]
        return ((max_tokens is not None and num_output >= max_tokens)
                or len(req.prompt_token_ids) + num_output >= self.max_model_len)

    def could_preempt(self) -> bool:
        """Whether the next schedule might preempt: the running requests could need more new
        blocks than are free, counting each as if scheduled for all its remaining tokens
        (conservative; admission never preempts). Async scheduling then runs synchronously."""
        kv = self.kv_cache_manager
        need = 0
        for req in self.running:
            tokens = req.num_tokens + req.num_output_placeholders
            need += max(0, cdiv(tokens, kv.block_size) - kv.num_blocks_of(req.request_id))
        return need > kv.num_free_blocks

    def has_swapped_waiting(self) -> bool:
        """Whether a swapped-out request waits (its admission would plan a swap-in)."""
        return bool(self.kv_cache_manager.num_cpu_blocks) and any(
            r.status == RequestStatus.SWAPPED for r in self.waiting)

    def mark_in_flight(self, output: SchedulerOutput) -> None:
        """Async scheduling: `output` is on the device. Advance its requests' num_computed_tokens
        now and count each sampling row's coming token as a placeholder (module docstring)."""
        for item in output.scheduled:
            req = item.request
            req.num_computed_tokens += item.num_new_tokens
            req.num_output_placeholders += item.samples

    def _can_never_fit(self, req: Request) -> bool:
        """Sampling its next token needs slots for all its tokens: more blocks than the cache has?"""
        kv = self.kv_cache_manager
        return cdiv(req.num_tokens, kv.block_size) > kv.num_usable_blocks

    def reset_prefix_cache(self) -> bool:
        """Forget the prefix cache's content; False (nothing changes) while blocks are in use."""
        return self.kv_cache_manager.reset_prefix_cache()

    def update(self, output: SchedulerOutput, sampled: dict[str, int], now: float | None = None,
               in_flight: bool = False) -> list[Request]:
        """Apply a step's results; return the requests that finished (blocks already freed).

        Args:
          output: the SchedulerOutput this step ran.
          sampled: request_id -> sampled token id, for every scheduled request with samples=True
            (other entries are ignored). A missing entry finishes that request with "error".
          now: timestamp for the timings (default: the scheduler clock).
          in_flight: `output` went through mark_in_flight (async scheduling): num_computed_tokens
            has advanced already, and each sampling row's placeholder becomes its token.
        Returns requests finished by this update, plus those finished during the last schedule().
        """
        now = self.clock() if now is None else now
        finished = self._finished_in_schedule
        self._finished_in_schedule = []
        for item in output.scheduled:
            req = item.request
            if req.status != RequestStatus.RUNNING:
                continue  # finished (e.g. aborted) between schedule() and update()
            if in_flight:
                req.num_output_placeholders -= item.samples
            else:
                req.num_computed_tokens += item.num_new_tokens
            if not item.samples:
                continue
            token = sampled.get(req.request_id)
            if token is None:
                self.running.remove(req)
                self._finish(req, RequestStatus.FINISHED_ERROR, None, None, "no token sampled", now)
                finished.append(req)
                continue
            token = int(token)
            req.output_token_ids.append(token)
            m = req.metrics  # the Request's timing properties live here: set them directly
            m.num_output_tokens = len(req.output_token_ids)
            if m.first_token_time is None:
                m.first_token_time = now
            m.last_token_time = now
            m.token_times.append(now)
            stop = self._check_stop(req, token)
            if stop is not None:
                status, stop_reason = stop
                self.running.remove(req)
                self._finish(req, status, None, stop_reason, None, now)
                finished.append(req)
        return finished

    def _check_stop(self, req: Request, token: int) -> tuple[RequestStatus, int | None] | None:
        # Stop tokens win over length when both hold: the request did end naturally.
        min_tokens, ignore_eos, stop_token_ids, max_tokens = req.stop_checks
        num_output = len(req.output_token_ids)
        if num_output >= min_tokens:
            if not ignore_eos and token in req.eos_token_ids:
                return RequestStatus.FINISHED_STOPPED, None
            if token in stop_token_ids:
                return RequestStatus.FINISHED_STOPPED, token
        if ((max_tokens is not None and num_output >= max_tokens)
                or len(req.prompt_token_ids) + num_output >= self.max_model_len):
            return RequestStatus.FINISHED_LENGTH, None
        return None


def _drop_placeholders(request: Request) -> None:
    """Forget the request's in-flight tokens (async scheduling): it finished or was preempted
    while later rows for it were on the device. Each such row fed one token, so
    num_computed_tokens rolls back to what a synchronous engine would hold."""
    request.num_computed_tokens -= request.num_output_placeholders
    request.num_output_placeholders = 0


def _check_preemption_mode(mode, where: str) -> None:
    if mode not in ("recompute", "swap"):
        raise ValueError(f"{where} must be 'recompute' or 'swap', got {mode!r}")
