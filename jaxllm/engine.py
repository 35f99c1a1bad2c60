"""Engine: add_request / step / abort_request — the one loop of jaxllm.

    plan    = scheduler.schedule()         # policy orders; mechanism spends budget, allocates, preempts
    batch   = prepare_batch(plan)          # numpy, padded to a token bucket
    sampled = runner.execute(batch)        # jitted forward + sampling on device, KV cache donated
    done    = scheduler.update(plan, ...)  # append tokens, check stops, free finished requests

Bad input is refused by `add_request` with a ValueError naming the value, before the request
touches any engine state, so one bad request never disturbs the others.
"""

from __future__ import annotations

import itertools
import time

import numpy as np

from jaxllm.config import EngineConfig, ResolvedEngineConfig
from jaxllm.core.kv_cache import KVCacheManager
from jaxllm.core.policies import get_policy
from jaxllm.core.scheduler import Scheduler
from jaxllm.detokenizer import Detokenizer
from jaxllm.inputs import parse_cache_salt, tokenize_prompt, validate_prompt
from jaxllm.outputs import (
    LogprobFormatter,
    RequestState,
    collect_prompt_logprobs,
    make_output,
    prompt_logprob_targets,
)
from jaxllm.request import Request, RequestOutput, RequestStatus
from jaxllm.runner.batch import prepare_batch
from jaxllm.runner.sampling_inputs import build_sampling_arrays
from jaxllm.sampling_params import SamplingParams


class Engine:
    """Continuous-batching engine over one model. See the module docstring for the loop."""

    def __init__(self, config: EngineConfig, model=None, tokenizer=None):
        from jaxllm.models.loader import load_model  # jax-side imports stay out of host modules
        from jaxllm.runner.runner import ModelRunner
        from jaxllm.tokenizer import load_tokenizer

        self.config = config
        self.mesh = None
        if config.parallel.tensor_parallel_size > 1:
            from jaxllm.parallel.runtime import load_for_engine

            # Params go straight into their shardings; the model's config may carry replicated
            # KV heads (jaxllm/parallel/rules.py).
            self.mesh, self.model = load_for_engine(config, model)
        else:
            self.model = model if model is not None else load_model(config.model, dtype=config.dtype)
        self.resolved: ResolvedEngineConfig = config.resolve(self.model.config)
        if tokenizer is None and not config.skip_tokenizer_init:
            tokenizer = load_tokenizer(config.model)
        self.tokenizer = tokenizer
        res, sched = self.resolved, config.scheduler
        self.kv_cache_manager = KVCacheManager(
            num_blocks=res.num_kv_blocks,
            block_size=config.cache.block_size,
            max_num_seqs=sched.max_num_seqs,
            max_blocks_per_seq=res.max_blocks_per_seq,
            enable_caching=config.cache.enable_prefix_caching,
        )
        self.block_manager = self.kv_cache_manager  # the older name: block_table, row_of, counts
        self.scheduler = Scheduler(
            self.kv_cache_manager,
            get_policy(sched.scheduling_policy),
            max_num_seqs=sched.max_num_seqs,
            max_num_batched_tokens=sched.max_num_batched_tokens,
            max_model_len=res.max_model_len,
            enable_chunked_prefill=sched.enable_chunked_prefill,
        )
        self.runner = ModelRunner(self.model, res, mesh=self.mesh)
        self._seed_rng = np.random.default_rng(config.seed)
        self._states: dict[str, RequestState] = {}  # unfinished requests' engine-side state
        self._logprob_fmt = LogprobFormatter(tokenizer)
        self._ids = itertools.count()
        self.num_steps = 0
        self.num_prompt_tokens_processed = 0
        self.num_generated_tokens = 0

    # ---------------------------------------------------------------- requests in and out

    def add_request(self, request_id, prompt, params: SamplingParams | None = None,
                    arrival_time: float | None = None, priority: int = 0, cache_salt: str | None = None) -> None:
        """Queue a request. `prompt` is a string, a list of token ids, or a dict
        {"prompt_token_ids": [...], "prompt": optional text, "cache_salt": optional str}.
        `cache_salt` (or the dict's): requests with different salts share no prefix-cache block.
        Raises ValueError on bad input."""
        request_id = str(request_id) if request_id is not None else str(next(self._ids))
        if request_id in self._states:
            raise ValueError(f"request_id {request_id!r} is already in use")
        params = params if params is not None else SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be a SamplingParams, got {type(params).__name__}")
        text, token_ids = tokenize_prompt(prompt, self.tokenizer)
        cache_salt = parse_cache_salt(prompt, cache_salt)
        validate_prompt(
            token_ids, params,
            vocab_size=self.model.config.vocab_size,
            max_model_len=self.resolved.max_model_len,
            block_size=self.config.cache.block_size,
            num_usable_blocks=self.resolved.num_kv_blocks - 1,
        )
        if not isinstance(priority, int):
            raise ValueError(f"priority must be an int, got {priority!r}")
        req = Request(
            request_id=request_id,
            prompt_token_ids=token_ids,
            sampling_params=params,
            eos_token_ids=self._eos_token_ids(),
            arrival_time=time.monotonic() if arrival_time is None else arrival_time,
            priority=priority,
            prompt=text,
            cache_salt=cache_salt,
        )
        self.scheduler.add_request(req)
        self._states[request_id] = RequestState(
            seed=params.seed if params.seed is not None else int(self._seed_rng.integers(2**31 - 1)),
            detokenizer=Detokenizer(self.tokenizer, params) if self.tokenizer is not None else None,
        )

    def abort_request(self, request_id) -> None:
        """Stop a request and free its blocks; unknown or finished ids are ignored, as in vLLM."""
        request_id = str(request_id)
        if self._states.pop(request_id, None) is not None:
            self.scheduler.abort_request(request_id)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    # ---------------------------------------------------------------- the loop

    def step(self) -> list[RequestOutput]:
        """Run one scheduling step; returns an output for every request that produced a token
        or finished in it (incremental: each holds the request's whole output so far)."""
        plan = self.scheduler.schedule()
        sampled = self._execute(plan) if plan.scheduled else {}
        finished = self.scheduler.update(plan, sampled, now=time.monotonic())
        self.num_steps += bool(plan.scheduled)

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
            out = make_output(req, self._states[req.request_id])
            out.num_cached_tokens = max(req.num_cached_tokens, 0)
            outputs.append(out)
            if req.is_finished:
                del self._states[req.request_id]
        return outputs

    def _detokenize(self, req: Request) -> None:
        """Update the request's text and end it at a stop string."""
        detok = self._states[req.request_id].detokenizer
        if detok is None:
            return
        stop = detok.append(req.output_token_ids)
        if stop is not None and not req.is_finished:
            self.scheduler.finish_request(req.request_id, RequestStatus.FINISHED_STOPPED, "stop", stop)

    def _execute(self, plan) -> dict[str, int]:
        """Run the planned batch on the device; returns request_id -> sampled token."""
        batch = prepare_batch(
            plan.scheduled,
            self.block_manager.block_table,
            self.block_manager.row_of,
            self.config.cache.block_size,
            self.resolved.token_buckets,
            self.config.scheduler.max_num_seqs,
        )
        rows = [
            (
                item.request.sampling_params,
                self._states[item.request.request_id].seed,
                item.request.prompt_token_ids,
                item.request.output_token_ids,
                item.request.eos_token_ids,
            )
            for item in plan.scheduled
        ]
        arrays, flags = build_sampling_arrays(rows, batch.padded_num_seqs)
        targets, prompt_k = prompt_logprob_targets(plan.scheduled, batch.cu_q_lens, batch.padded_num_tokens)
        result = self.runner.execute(batch, arrays, flags, targets, prompt_k)
        if prompt_k:
            collect_prompt_logprobs(plan.scheduled, batch.cu_q_lens, result, self._states, self._logprob_fmt)

        sampled: dict[str, int] = {}
        for i, item in enumerate(plan.scheduled):
            req = item.request
            # Prompt tokens computed for the first time or again after a preemption.
            self.num_prompt_tokens_processed += max(
                0, min(req.num_computed_tokens + item.num_new_tokens, req.num_prompt_tokens)
                - req.num_computed_tokens,
            )
            if item.samples:
                token = int(result["token_ids"][i])
                sampled[req.request_id] = token
                k = req.sampling_params.logprobs
                if k is not None:
                    self._states[req.request_id].logprobs.append(self._logprob_fmt.sampled(result, i, token, k))
        self.num_generated_tokens += len(sampled)
        return sampled

    def warmup(self, params: SamplingParams | None = None) -> None:
        """Compile the step for every token bucket, for batches sampled like `params`.

        Runs all-padding batches (their K/V go to sink block 0), so no request state changes.
        Sampling features a batch switches on (penalties, top-k, logprobs...) are jit statics:
        warm up once per kind of SamplingParams the experiment will use.
        """
        params = params if params is not None else SamplingParams()
        bs, max_seqs = self.config.cache.block_size, self.config.scheduler.max_num_seqs
        for t in self.resolved.token_buckets:
            batch = prepare_batch([], self.block_manager.block_table, None, bs, (t,), max_seqs)
            # One dummy row so the flags match `params`; it samples from a padding row.
            arrays, flags = build_sampling_arrays([(params, 0, [0], [], ())], batch.padded_num_seqs)
            self.runner.execute(batch, arrays, flags)

    # ---------------------------------------------------------------- helpers

    def _eos_token_ids(self) -> tuple[int, ...]:
        ids = set(self.model.config.eos_token_ids)
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
            "num_running": self.scheduler.num_running,
            "num_waiting": self.scheduler.num_waiting,
            "num_preemptions": self.scheduler.num_preemptions,
            "num_compilations": self.runner.num_compilations,
            "num_steps": self.num_steps,
            "num_prompt_tokens_processed": self.num_prompt_tokens_processed,
            "num_generated_tokens": self.num_generated_tokens,
            # Prefix cache, over admissions: tokens looked up, tokens found cached.
            "prefix_cache_queries": bm.prefix_cache_queries,
            "prefix_cache_hits": bm.prefix_cache_hits,
            "prefix_cache_hit_rate": bm.prefix_cache_hit_rate,
        }

    def reset_prefix_cache(self) -> bool:
        """Forget all cached KV content (e.g. after a weight update). As vLLM: returns False,
        changing nothing, while any request holds blocks."""
        return self.scheduler.reset_prefix_cache()

