"""Engine: add_request / step / abort_request — the one loop of jaxllm.

    plan    = scheduler.schedule()         # policy orders; mechanism spends budget, allocates, preempts
    batch   = prepare_batch(plan)          # numpy, padded to a token bucket
    sampled = runner.execute(batch)        # jitted forward + sampling on device, KV cache donated
    done    = scheduler.update(plan, ...)  # append tokens, check stops, free finished requests

With EngineConfig.async_scheduling the host schedules step N+1 while the device runs step N
(jaxllm/async_scheduling.py); each step() then returns the outputs of the step before.

Bad input is refused by `add_request` with a ValueError naming the value, before the request
touches any engine state, so one bad request never disturbs the others.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
import warnings
from typing import Callable

import numpy as np

from jaxllm.async_scheduling import async_step, needs_host_tokens
from jaxllm.config import EngineConfig, ResolvedEngineConfig
from jaxllm.core.kv_cache import KVCacheManager
from jaxllm.core.policies import get_policy
from jaxllm.core.scheduler import Scheduler
from jaxllm.detokenizer import Detokenizer
from jaxllm.inputs import parse_cache_salt, tokenize_prompt, validate_prompt
from jaxllm.observers import StepObserver, StepStats
from jaxllm.outputs import (
    LogprobFormatter,
    ParentRequest,
    RequestState,
    collect_prompt_logprobs,
    make_output,
    prompt_logprob_targets,
)
from jaxllm.request import Request, RequestOutput, RequestStatus
from jaxllm.runner.batch import pick_bucket, prepare_batch
from jaxllm.runner.sampling_inputs import GENERAL, OutputsWithPlaceholders, build_sampling_inputs
from jaxllm.runner.instrument_inputs import (
    HiddenStateBuffer,
    InstrumentInputs,
    build_instrument_inputs,
    collect_hidden_states,
    intervention_salt,
    resolve_hidden_layers,
    resolve_interventions,
)
from jaxllm.runner.step_io import INSTRUMENTED_STEP_VARIANTS, STEP_VARIANTS, StepInputs
from jaxllm.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class Engine:
    """Continuous-batching engine over one model. See the module docstring for the loop."""

    batch_queue = None  # pipeline parallelism: the micro-batches in flight (core/batch_queue.py)
    _async = False  # async scheduling on (the simulator never overlaps)

    def __init__(self, config: EngineConfig, model=None, tokenizer=None, clock: Callable[[], float] = time.monotonic):
        """`clock` (seconds) stamps arrivals, request timings and step records; the scheduler
        shares it, so a simulator or a multi-host run can give every part one clock."""
        from jaxllm.models.loader import load_model  # jax-side imports stay out of host modules
        from jaxllm.runner.runner import SWAP_MEMORY_KIND, ModelRunner, host_memory_available
        from jax import devices as jax_devices
        from jaxllm.tokenizer import load_tokenizer

        self.config = config
        self.clock = clock
        self.mesh = None
        if config.parallel.pipeline_parallel_size > 1:
            from jaxllm.parallel.pipeline import load_for_pipeline

            self.mesh, stage_plan, self.model = load_for_pipeline(config, model)
        elif config.parallel.tensor_parallel_size > 1:
            from jaxllm.parallel.runtime import load_for_engine

            # Params go straight into their shardings; the model's config may carry replicated
            # KV heads (jaxllm/parallel/rules.py).
            self.mesh, self.model = load_for_engine(config, model)
        else:
            self.model = model if model is not None else load_model(config.model, dtype=config.dtype)
        from jaxllm.runner.memory import device_memory

        devices = self.mesh.devices.flat if self.mesh is not None else jax_devices()[:1]
        self.resolved: ResolvedEngineConfig = config.resolve(self.model.config, memory=device_memory(devices))
        logger.info("KV cache: %.2f GiB per device (%s)", self.resolved.kv_cache_bytes / (1 << 30),
                    self.resolved.kv_cache_sizing)
        if self.resolved.num_cpu_blocks and not host_memory_available(
                self.mesh.devices.flat if self.mesh is not None else jax_devices()):
            warnings.warn(f"this backend has no '{SWAP_MEMORY_KIND}' memory for the swap pool: "
                          f"preemption recomputes instead of swapping")
            self.resolved = dataclasses.replace(self.resolved, num_cpu_blocks=0)
        if tokenizer is None and not config.skip_tokenizer_init:
            tokenizer = load_tokenizer(config.model)
        self._init_host(self.model.config, tokenizer)
        if config.parallel.pipeline_parallel_size > 1:
            from jaxllm.core.batch_queue import BatchQueue
            from jaxllm.runner.pipeline_runner import PipelineRunner

            self.runner = PipelineRunner(self.model, self.resolved, self.mesh, stage_plan)
            self.batch_queue = BatchQueue(stage_plan.num_stages)
        else:
            self.runner = ModelRunner(self.model, self.resolved, mesh=self.mesh)
            self.model = self.runner.model  # its projections packed with matmul_backend "cpu"
        self._async = config.overlaps_steps

    def _init_host(self, model_config, tokenizer) -> None:
        """The host side of an engine (KV-cache manager, scheduler, request bookkeeping), built from
        self.config / self.resolved / self.clock. Shared with jaxllm.sim.SimulatedEngine, which
        runs this same host code with a cost model in place of the device."""
        config, res, sched = self.config, self.resolved, self.config.scheduler
        self.model_config = model_config
        self.tokenizer = tokenizer
        self.kv_cache_manager = KVCacheManager(
            num_blocks=res.num_kv_blocks,
            block_size=config.cache.block_size,
            max_num_seqs=sched.max_num_seqs,
            max_blocks_per_seq=res.max_blocks_per_seq,
            enable_caching=config.cache.enable_prefix_caching,
            num_cpu_blocks=self.resolved.num_cpu_blocks,
        )
        self.block_manager = self.kv_cache_manager  # the older name: block_table, row_of, counts
        self.scheduler = Scheduler(
            self.kv_cache_manager,
            get_policy(sched.scheduling_policy),
            max_num_seqs=sched.max_num_seqs,
            max_num_batched_tokens=sched.max_num_batched_tokens,
            max_model_len=res.max_model_len,
            enable_chunked_prefill=sched.enable_chunked_prefill,
            preemption_mode=sched.preemption_mode,
            clock=self.clock,
        )
        self._seed_rng = np.random.default_rng(config.seed)
        self._states: dict[str, RequestState] = {}  # unfinished requests' engine-side state
        self._parents: dict[str, ParentRequest] = {}  # unfinished requests with n > 1
        self._parent_of: dict[str, tuple[ParentRequest, int]] = {}  # child id -> (parent, index)
        self._logprob_fmt = LogprobFormatter(tokenizer)
        self._ids = itertools.count()
        self.num_steps = 0
        self.num_prompt_tokens_processed = 0
        self.num_generated_tokens = 0
        self.num_failed_steps = 0
        self.num_recorded_steps = 0  # StepStats records made (steps that ran, preempted or copied)
        self._observers: list[StepObserver] = []
        # Async scheduling (jaxllm/async_scheduling.py): the step on the device, the requests
        # whose next step needs their tokens on the host, steps scheduled while the one before
        # was on the device, and steps that waited for it first (get_stats).
        self._in_flight_step = None
        self._host_token_ids: set[str] = set()
        self.num_async_overlapped_steps = 0
        self.num_async_sync_steps = 0

    # ---------------------------------------------------------------- requests in and out

    def add_request(self, request_id, prompt, params: SamplingParams | None = None,
                    arrival_time: float | None = None, priority: int = 0, cache_salt: str | None = None) -> None:
        """Queue a request. `prompt` is a string, a list of token ids, or a dict
        {"prompt_token_ids": [...], "prompt": optional text, "cache_salt": optional str}.
        `cache_salt` (or the dict's): requests with different salts share no prefix-cache block.
        Raises ValueError on bad input.

        With params.n > 1 the request runs as n child requests (see outputs.ParentRequest) and
        step() reports them as one RequestOutput with n completions."""
        request_id = str(request_id) if request_id is not None else str(next(self._ids))
        if request_id in self._states or request_id in self._parents:
            raise ValueError(f"request_id {request_id!r} is already in use")
        params = params if params is not None else SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be a SamplingParams, got {type(params).__name__}")
        text, token_ids = self.check_prompt(prompt, params)
        cache_salt = parse_cache_salt(prompt, cache_salt)
        if not isinstance(priority, int):
            raise ValueError(f"priority must be an int, got {priority!r}")
        arrival_time = self.clock() if arrival_time is None else arrival_time
        if params.n == 1:
            self._add_one(request_id, token_ids, text, params, arrival_time, priority, cache_salt)
            if self._async and needs_host_tokens(params, False):
                self._host_token_ids.add(request_id)
            return
        child_ids = [ParentRequest.child_id(request_id, i) for i in range(params.n)]
        taken = [c for c in child_ids if c in self._states or c in self._parents]
        if taken:
            raise ValueError(f"request_id {request_id!r}: its samples' ids {taken} are already in use")
        parent = self._parents[request_id] = ParentRequest(request_id, child_ids)
        for i, child_id in enumerate(child_ids):
            child_params = dataclasses.replace(
                params, n=1,
                seed=params.seed + i if params.seed is not None else None,
                prompt_logprobs=params.prompt_logprobs if i == 0 else None,
            )
            self._add_one(child_id, token_ids, text, child_params, arrival_time, priority, cache_salt)
            self._parent_of[child_id] = (parent, i)
            if self._async:
                self._host_token_ids.add(child_id)

    def check_prompt(self, prompt, params: SamplingParams) -> tuple[str | None, list[int]]:
        """(text, token ids) of a prompt this engine can serve with `params`; ValueError naming
        the problem otherwise (the one validation path of add_request and LLM.beam_search)."""
        text, token_ids = tokenize_prompt(prompt, self.tokenizer)
        if self.batch_queue is not None and (params.output_hidden_states or params.residual_interventions):
            raise ValueError("output_hidden_states and residual_interventions are not supported with "
                             f"pipeline_parallel_size={self.config.parallel.pipeline_parallel_size} (only 1)")
        validate_prompt(
            token_ids, params,
            vocab_size=self.model_config.vocab_size,
            max_model_len=self.resolved.max_model_len,
            block_size=self.config.cache.block_size,
            num_usable_blocks=self.resolved.num_kv_blocks - 1,
            prefix_caching=self.config.cache.enable_prefix_caching,
            num_layers=self.model_config.num_layers,
            hidden_size=self.model_config.hidden_size,
        )
        return text, token_ids

    def _add_one(self, request_id: str, token_ids: list[int], text, params: SamplingParams,
                 arrival_time: float, priority: int, cache_salt: str | None) -> None:
        cfg = self.model_config
        hidden_layers = resolve_hidden_layers(params.output_hidden_states, cfg.num_layers)
        interventions = resolve_interventions(params.residual_interventions, cfg.num_layers, cfg.hidden_size)
        req = Request(
            request_id=request_id,
            prompt_token_ids=token_ids,
            sampling_params=params,
            eos_token_ids=self.eos_token_ids(),
            arrival_time=arrival_time,
            priority=priority,
            prompt=text,
            cache_salt=intervention_salt(cache_salt, interventions),
        )
        self.scheduler.add_request(req)
        self._states[request_id] = RequestState(
            seed=params.seed if params.seed is not None else int(self._seed_rng.integers(2**31 - 1)),
            detokenizer=Detokenizer(self.tokenizer, params) if self.tokenizer is not None else None,
            hidden_states=HiddenStateBuffer(hidden_layers, cfg.hidden_size) if hidden_layers else None,
            interventions=interventions,
        )

    def abort_request(self, request_id) -> None:
        """Stop a request and free its blocks; unknown or finished ids are ignored, as in vLLM.
        Aborting a request with n > 1 (or any one of its samples) aborts all its samples."""
        request_id = str(request_id)
        if request_id in self._parent_of:
            request_id = self._parent_of[request_id][0].request_id
        if self.batch_queue is not None and self._in_flight(request_id):
            # Its blocks must outlive its in-flight batch: abort once the token returns.
            self.batch_queue.deferred_aborts.append(request_id)
            return
        parent = self._parents.pop(request_id, None)
        for rid in parent.child_ids if parent is not None else [request_id]:
            self._parent_of.pop(rid, None)
            self._host_token_ids.discard(rid)
            if self._states.pop(rid, None) is not None:
                self.scheduler.abort_request(rid)

    def _in_flight(self, request_id: str) -> bool:
        """Whether the request (or any sample of it) is in a pipeline's in-flight batch."""
        parent = self._parents.get(request_id)
        ids = self.batch_queue.request_ids()
        return any(rid in ids for rid in (parent.child_ids if parent is not None else [request_id]))

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    # ---------------------------------------------------------------- the loop

    def step(self) -> list[RequestOutput]:
        """Run one scheduling step; returns an output for every request that produced a token
        or finished in it (incremental: each holds the request's whole output so far)."""
        if self.batch_queue is not None:
            from jaxllm.pipeline_step import pipeline_step

            return pipeline_step(self)
        if self._async:
            return async_step(self)
        start = self.clock()
        kv = self.kv_cache_manager
        lookups_before = (kv.prefix_cache_queries, kv.prefix_cache_hits)
        plan = self.scheduler.schedule()
        footprint = self._kv_footprint()  # while the step runs, for observers
        sampled: dict[str, int] = {}
        failed: list[Request] = []
        timing = _DeviceTiming(self.clock, self.runner)
        if plan.scheduled or plan.has_swaps:
            try:
                # Before the forward: swap-outs read blocks this step may reuse, swap-ins land
                # before they are read (the order is the scheduler's docstring's).
                with timing:
                    self.runner.swap(plan.blocks_to_swap_out, plan.blocks_to_swap_in)
                if plan.scheduled:
                    sampled = self._execute(plan, timing)
            except Exception as e:  # noqa: BLE001 - a failed step must not take the engine down
                failed = self._fail_step(plan, e)
        now = self.clock()
        finished = self.scheduler.update(plan, sampled, now=now) + failed
        self.num_steps += bool(plan.scheduled)

        outputs, num_finished = self._make_outputs(plan, sampled, finished)
        if plan.scheduled or plan.preempted or plan.has_swaps:
            lookups = (kv.prefix_cache_queries - lookups_before[0], kv.prefix_cache_hits - lookups_before[1])
            self._notify_observers(plan, start, now, num_finished, footprint, lookups, timing)
        # A request with n > 1 reports once per step, with all its samples so far.
        return list({out.request_id: out for out in outputs}.values())

    def _make_outputs(self, plan, sampled: dict[str, int], finished: list[Request]) -> tuple[list[RequestOutput], int]:
        """Detokenize and report every request that got a token or finished in this step;
        returns (outputs, how many of those requests finished)."""
        outputs = []
        touched = [item.request for item in plan.scheduled if item.request.request_id in sampled]
        touched += [r for r in finished if r.request_id not in sampled]
        for req in touched:
            try:
                self._detokenize(req)
            except Exception as e:  # noqa: BLE001 - one request's failure must not stop the others
                if not req.is_finished:
                    self.scheduler.finish_request(
                        req.request_id, RequestStatus.FINISHED_ERROR, error=f"detokenization failed: {e!r}"
                    )
                req.error = req.error or f"detokenization failed: {e!r}"
            output = make_output(req, self._states[req.request_id])
            if req.is_finished:
                del self._states[req.request_id]
                self._host_token_ids.discard(req.request_id)
            outputs.append(self._fan_in(output) if req.request_id in self._parent_of else output)
        return outputs, sum(r.is_finished for r in touched)

    def _fan_in(self, child_output: RequestOutput) -> RequestOutput:
        parent, index = self._parent_of[child_output.request_id]
        output = parent.update(index, child_output)
        if child_output.finished:
            del self._parent_of[child_output.request_id]
        if output.finished:
            del self._parents[parent.request_id]
        return output

    def add_step_observer(self, observer: StepObserver) -> None:
        """Call `observer(StepStats)` after every step that ran a batch (jaxllm/observers.py)."""
        self._observers.append(observer)

    def remove_step_observer(self, observer: StepObserver) -> None:
        self._observers.remove(observer)

    def _kv_footprint(self) -> tuple[int, int, int, int]:
        """(used, referenced, free, cached) KV blocks now."""
        kv = self.kv_cache_manager
        return kv.num_used_blocks, kv.num_referenced_blocks, kv.num_free_blocks, kv.pool.num_cached_blocks

    def _notify_observers(self, plan, start: float, now: float, num_finished: int,
                          footprint: tuple[int, int, int, int], lookups: tuple[int, int],
                          timing: _DeviceTiming, overlap=None) -> None:
        """overlap: an async step's async_scheduling._Timing (None: a synchronous step)."""
        step = self.num_recorded_steps
        self.num_recorded_steps += 1
        if not self._observers:
            return
        num_decode_tokens = num_context_tokens = 0  # a decode row feeds exactly one token
        for item in plan.scheduled:  # one pass: this runs every step over every row
            n, computed = item.num_new_tokens, item.num_computed_tokens
            num_context_tokens += computed + n
            num_decode_tokens += n == 1 and computed >= len(item.request.prompt_token_ids)
        swapped = sum(r.status == RequestStatus.SWAPPED for r in plan.preempted)
        end = self.clock()
        host_time = (end - start) - timing.seconds
        stats = StepStats(
            step=step,
            start_time=start,
            time=now,
            end_time=end,
            num_scheduled_requests=len(plan.scheduled),
            num_prefill_requests=len(plan.scheduled) - num_decode_tokens,
            num_decode_requests=num_decode_tokens,
            num_batched_tokens=plan.num_batched_tokens,
            num_prefill_tokens=plan.num_batched_tokens - num_decode_tokens,
            num_decode_tokens=num_decode_tokens,
            num_padded_tokens=pick_bucket(plan.num_batched_tokens, self.resolved.token_buckets) if plan.scheduled else 0,
            num_context_tokens=num_context_tokens,
            scheduled=tuple([(item.request.request_id, item.num_new_tokens) for item in plan.scheduled]),
            num_running=self.scheduler.num_running,
            num_waiting=self.scheduler.num_waiting,
            num_preempted=len(plan.preempted),
            num_preempted_recompute=len(plan.preempted) - swapped,
            num_preempted_swap=swapped,
            preempted=tuple(r.request_id for r in plan.preempted),
            num_blocks_swapped_out=len(plan.blocks_to_swap_out),
            num_blocks_swapped_in=len(plan.blocks_to_swap_in),
            num_finished=num_finished,
            kv_blocks_used=footprint[0],
            kv_blocks_referenced=footprint[1],
            kv_blocks_free=footprint[2],
            kv_blocks_cached=footprint[3],
            num_kv_blocks=self.kv_cache_manager.num_usable_blocks,
            prefix_cache_queries=lookups[0],
            prefix_cache_hits=lookups[1],
            host_time=host_time,
            device_time=timing.seconds,
            compile_time=timing.compile_seconds,
            row_num_computed_tokens=tuple([item.num_computed_tokens for item in plan.scheduled]),
            host_time_overlapped=0.0 if overlap is None else max(0.0, host_time - overlap.idle_host),
            fetch_wait_time=0.0 if overlap is None else overlap.fetch_wait,
            scheduled_in_flight=overlap is not None and overlap.scheduled_in_flight and bool(plan.scheduled),
        )
        for observer in list(self._observers):
            observer(stats)

    def _detokenize(self, req: Request) -> None:
        """Update the request's text and end it at a stop string."""
        detok = self._states[req.request_id].detokenizer
        if detok is None:
            return
        stop = detok.append(req.output_token_ids)
        if stop is not None and not req.is_finished:
            self.scheduler.finish_request(req.request_id, RequestStatus.FINISHED_STOPPED, "stop", stop)

    def build_step_inputs(self, scheduled, in_flight_rows: dict[str, int] | None = None) -> StepInputs:
        """The one builder of a step's inputs from the scheduler's ScheduledRequest items.
        in_flight_rows: async scheduling, request_id -> row of the step on the device that
        samples its next token (batch.prepare_batch); an async engine passes {} without one."""
        if in_flight_rows is None and self._async:
            in_flight_rows = {}
        batch = prepare_batch(
            scheduled,
            self.block_manager.block_table,
            self.block_manager.row_of,
            self.config.cache.block_size,
            self.resolved.token_buckets,
            self.config.scheduler.max_num_seqs,
            in_flight_rows,
        )
        rows = [
            (
                item.request.sampling_params,
                self._states[item.request.request_id].seed,
                item.request.prompt_token_ids,
                # In-flight tokens count for the RNG step and min_tokens (async scheduling).
                OutputsWithPlaceholders(item.request.output_token_ids, item.request.num_output_placeholders)
                if item.request.num_output_placeholders else item.request.output_token_ids,
                item.request.eos_token_ids,
            )
            for item in scheduled
        ]
        targets = prompt_logprob_targets(scheduled, batch.cu_q_lens, batch.padded_num_tokens)
        instruments = build_instrument_inputs(
            scheduled, self._instrumented_requests(scheduled), batch.cu_q_lens, batch.padded_num_seqs,
            self.model_config.num_layers, self.model_config.hidden_size,
        )
        sampling, sampler = self._sampling_inputs(
            rows, batch.padded_num_seqs, force_general=targets is not None or instruments is not None)
        return StepInputs(batch, sampling, sampler, targets, instruments)

    def _instrumented_requests(self, scheduled) -> dict:
        """request_id -> (hidden-state buffer, interventions) of the scheduled requests with either."""
        out = {}
        for item in scheduled:
            state = self._states[item.request.request_id]
            if state.hidden_states is not None or state.interventions:
                out[item.request.request_id] = (state.hidden_states, state.interventions)
        return out

    def _execute(self, plan, timing: _DeviceTiming) -> dict[str, int]:
        """Run the planned batch on the device; returns request_id -> sampled token."""
        step = self.build_step_inputs(plan.scheduled)
        with timing:
            result = self.runner.execute(step)
        return self._apply_result(plan, step, result)

    def _apply_result(self, plan, step: StepInputs, result) -> dict[str, int]:
        """Read a finished step's outputs: prompt logprobs, counters, logprobs; returns
        request_id -> sampled token for the rows that sample."""
        if step.prompt_logprobs:
            collect_prompt_logprobs(plan.scheduled, step.batch.cu_q_lens, result, self._states, self._logprob_fmt)
        if step.instrumented and result.hidden_states is not None:
            collect_hidden_states(step.instruments, result.hidden_states, self._states)

        self._count_prompt_tokens(plan.scheduled)
        sampled: dict[str, int] = {}
        for i, item in enumerate(plan.scheduled):
            req = item.request
            # Not running: finished (aborted, or stopped with this row in flight) since scheduled.
            if item.samples and req.status == RequestStatus.RUNNING:
                token = int(result.token_ids[i])
                sampled[req.request_id] = token
                k = req.sampling_params.logprobs
                if k is not None:
                    self._states[req.request_id].add_logprob(self._logprob_fmt.sampled(result, i, token, k), token)
        self.num_generated_tokens += len(sampled)
        return sampled

    def _count_prompt_tokens(self, scheduled) -> None:
        """Prompt tokens computed for the first time or again after a preemption (get_stats)."""
        total = 0
        for item in scheduled:
            req = item.request
            computed = item.num_computed_tokens  # at schedule time (async advances it at dispatch)
            num_prompt = len(req.prompt_token_ids)
            if computed < num_prompt:  # else a decode row: no prompt token
                total += min(computed + item.num_new_tokens, num_prompt) - computed
        self.num_prompt_tokens_processed += total

    def _sampling_inputs(self, rows, num_rows_padded: int, force_general: bool = False):
        return build_sampling_inputs(
            rows, num_rows_padded,
            vocab_size=self.model_config.vocab_size,
            history_width=self.resolved.max_model_len,
            force_general=force_general,
        )

    def _fail_step(self, plan, error: Exception) -> list[Request]:
        """A step that raised (a compilation out of memory, an XLA error): its requests end with
        an error naming the cause; the others keep running. If the failure consumed the donated
        KV cache, a fresh one is allocated and the other running requests recompute (preemption)."""
        message = f"engine step failed: {type(error).__name__}: {error}"
        logger.error("%s (finishing %d requests)", message, len(plan.scheduled), exc_info=error)
        self.num_failed_steps += 1
        failed = []
        for item in plan.scheduled:
            req = self.scheduler.finish_request(item.request_id, RequestStatus.FINISHED_ERROR, error=message)
            if req is not None:
                failed.append(req)
        lost = self.runner.kv_cache_lost()
        if lost:
            self.runner.reset_kv_cache()
        if lost or plan.has_swaps:  # a copy may not have happened: swapped content is suspect
            self.scheduler.preempt_all_running()
        return failed

    def warmup(self, step_variants=STEP_VARIANTS, instrumented: bool = False) -> int:
        """Compile the step for every token bucket and every step variant (step_io.STEP_VARIANTS:
        the greedy sampler, the general one, the general one with prompt logprobs). Sampling
        parameters are data, so after this no request mix compiles anything. Returns the number
        of compilations it caused (0 when another engine on the same model compiled them).
        `step_variants` narrows it (a benchmark that runs only greedy steps passes
        ((GREEDY, False),)); steady state is then free of compilation only for those variants.

        instrumented=True also compiles INSTRUMENTED_STEP_VARIANTS (hidden states, interventions;
        otherwise they compile on first use). The hidden-state gathers compile on first use.

        With a swap pool it first compiles the block copies for every bucket (runner.swap_buckets;
        copies between sink block 0 and host scratch block 0).

        Runs all-padding batches (their K/V go to sink block 0), so no request state changes;
        layered, through one decoder layer per distinct layer program (runner.warmup_step).
        """
        bs, max_seqs = self.config.cache.block_size, self.config.scheduler.max_num_seqs
        before = self.runner.num_compilations
        if self.runner.host_caches is not None:
            self.runner.warmup_swap()
        for t in self.resolved.token_buckets:
            batch = prepare_batch([], self.block_manager.block_table, None, bs, (t,), max_seqs,
                                  {} if self._async else None)
            variants = [(v, None) for v in step_variants]
            if instrumented:
                none = np.zeros(0, np.int32)  # no intervention, nothing captured
                variants += [(v, InstrumentInputs(None, none, none, (), 0)) for v in INSTRUMENTED_STEP_VARIANTS]
            for (sampler, prompt_logprobs), instruments in variants:
                sampling, chosen = self._sampling_inputs([], batch.padded_num_seqs, force_general=sampler == GENERAL)
                targets = np.zeros(batch.padded_num_tokens, np.int32) if prompt_logprobs else None
                self.runner.warmup_step(StepInputs(batch, sampling, chosen, targets, instruments))
        return self.runner.num_compilations - before

    # ---------------------------------------------------------------- helpers

    def eos_token_ids(self) -> tuple[int, ...]:
        """The model's and the tokenizer's EOS ids: what ends a request unless ignore_eos."""
        ids = set(self.model_config.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        return tuple(sorted(ids))

    def get_stats(self) -> dict:
        """Counters for experiment scripts: cache use, queue lengths, preemptions, compilations."""
        bm = self.block_manager
        return {
            "num_kv_blocks": self.resolved.num_kv_blocks - 1,
            "kv_blocks_used": bm.num_used_blocks,
            "kv_blocks_free": bm.num_free_blocks,
            "kv_cache_bytes": self.resolved.kv_cache_bytes,
            "kv_cache_sizing": self.resolved.kv_cache_sizing,
            "num_running": self.scheduler.num_running,
            "num_waiting": self.scheduler.num_waiting,
            "num_preemptions": self.scheduler.num_preemptions,
            # The attention the steps run ("auto" resolved): what jaxllm.sim.fit needs to know.
            "attention_backend": self.runner.attention_backend,
            # Who multiplied the decoder projections ("auto" resolved): "xla" or "cpu".
            "matmul_backend": self.runner.matmul_backend,
            # Step and copy executables this engine built; those loaded from the persistent
            # compilation cache (EngineConfig.compile_cache_dir) are counted again on their own.
            "num_compilations": self.runner.num_compilations,
            "num_compile_cache_hits": self.runner.num_compile_cache_hits,
            # Step variants this engine has run: at most MAX_STEP_VARIANTS_PER_BUCKET per token
            # bucket (len(STEP_VARIANTS) without hidden states or interventions), whatever the
            # requests ask for. num_gather_variants: the hidden-state gathers, at most one per
            # (token bucket T, power-of-two capture count <= (L + 1) * T). num_executables counts the compiled steps alive in
            # the whole process (every engine sharing the jit), which is what costs memory.
            "num_step_variants": len(self.runner.step_variants_used),
            "num_gather_variants": len(self.runner.gather_variants_used),
            "num_executables": self.runner.num_executables,
            "num_failed_steps": self.num_failed_steps,
            # Async scheduling: steps scheduled while the previous one was on the device, and
            # steps that first waited for it (their schedule needed its tokens on the host).
            "num_async_overlapped_steps": self.num_async_overlapped_steps,
            "num_async_sync_steps": self.num_async_sync_steps,
            "num_steps": self.num_steps,
            "num_prompt_tokens_processed": self.num_prompt_tokens_processed,
            "num_generated_tokens": self.num_generated_tokens,
            # Prefix cache, over admissions: tokens looked up, tokens found cached.
            "prefix_cache_queries": bm.prefix_cache_queries,
            "prefix_cache_hits": bm.prefix_cache_hits,
            "prefix_cache_hit_rate": bm.prefix_cache_hit_rate,
            # Swap preemption: the host pool (usable blocks, 0 without one), requests and blocks
            # swapped out and in, and swaps that recomputed because the pool was full.
            "preemption_mode": self.scheduler.preemption_mode,
            "num_cpu_blocks": bm.num_cpu_blocks,
            "cpu_blocks_used": bm.num_cpu_blocks - bm.num_free_cpu_blocks,
            "num_swap_outs": self.scheduler.num_swap_outs,
            "num_swap_ins": self.scheduler.num_swap_ins,
            "num_blocks_swapped_out": self.scheduler.num_blocks_swapped_out,
            "num_blocks_swapped_in": self.scheduler.num_blocks_swapped_in,
            "num_swap_fallbacks": self.scheduler.num_swap_fallbacks,
        }

    def reset_prefix_cache(self) -> bool:
        """Forget all cached KV content (e.g. after a weight update). As vLLM: returns False,
        changing nothing, while any request holds blocks."""
        return self.scheduler.reset_prefix_cache()



class _DeviceTiming:
    """Accumulates the seconds spent in device calls (`with timing: runner.execute(...)`), and the
    XLA compilation seconds among them (the runner's process-wide counter), for StepStats."""

    def __init__(self, clock: Callable[[], float], runner) -> None:
        self._clock, self._runner = clock, runner
        self.seconds = 0.0
        self.compile_seconds = 0.0

    def __enter__(self) -> None:
        self._start = self._clock()
        self._compile_start = self._runner.compile_seconds

    def __exit__(self, *exc) -> None:
        self.seconds += self._clock() - self._start
        self.compile_seconds += self._runner.compile_seconds - self._compile_start
