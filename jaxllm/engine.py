"""Engine: add_request / step / abort_request — the one loop of jaxllm.

    plan    = scheduler.schedule()         # policy orders; mechanism spends budget, allocates, preempts
    batch   = prepare_batch(plan)          # numpy, padded to a token bucket
    sampled = runner.execute(batch)        # jitted forward + sampling on device, KV cache donated
    done    = scheduler.update(plan, ...)  # append tokens, check stops, free finished requests

Bad input is refused by `add_request` with a ValueError naming the value, before the request
touches any engine state, so one bad request never disturbs the others.
"""

from __future__ import annotations

import dataclasses
import itertools
import time

import numpy as np

from jaxllm.config import EngineConfig, ResolvedEngineConfig
from jaxllm.core.block_manager import BlockManager
from jaxllm.core.policies import get_policy
from jaxllm.core.scheduler import Scheduler
from jaxllm.detokenizer import Detokenizer
from jaxllm.request import CompletionOutput, Logprob, Request, RequestOutput, RequestStatus
from jaxllm.runner.batch import prepare_batch
from jaxllm.runner.sampling_inputs import build_sampling_arrays
from jaxllm.sampling_params import SamplingParams, logprobs_bucket


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
        self.block_manager = BlockManager(
            num_blocks=res.num_kv_blocks,
            block_size=config.cache.block_size,
            max_num_seqs=sched.max_num_seqs,
            max_blocks_per_seq=res.max_blocks_per_seq,
        )
        self.scheduler = Scheduler(
            self.block_manager,
            get_policy(sched.scheduling_policy),
            max_num_seqs=sched.max_num_seqs,
            max_num_batched_tokens=sched.max_num_batched_tokens,
            max_model_len=res.max_model_len,
            enable_chunked_prefill=sched.enable_chunked_prefill,
        )
        self.runner = ModelRunner(self.model, res, mesh=self.mesh)
        self._seed_rng = np.random.default_rng(config.seed)
        self._seeds: dict[str, int] = {}
        self._detok: dict[str, Detokenizer] = {}
        self._logprobs: dict[str, list] = {}  # per request: one {token_id: Logprob} per output
        self._prompt_logprobs: dict[str, list] = {}  # per request: [None, {token_id: Logprob}, ...]
        self._live: dict[str, Request] = {}
        self._ids = itertools.count()
        self.num_steps = 0
        self.num_prompt_tokens_processed = 0
        self.num_generated_tokens = 0

    # ---------------------------------------------------------------- requests in and out

    def add_request(self, request_id, prompt, params: SamplingParams | None = None,
                    arrival_time: float | None = None, priority: int = 0) -> None:
        """Queue a request. `prompt` is a string, a list of token ids, or a dict
        {"prompt_token_ids": [...], "prompt": optional text}. Raises ValueError on bad input."""
        request_id = str(request_id) if request_id is not None else str(next(self._ids))
        if request_id in self._live:
            raise ValueError(f"request_id {request_id!r} is already in use")
        params = params if params is not None else SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be a SamplingParams, got {type(params).__name__}")
        text, token_ids = self._tokenize(prompt)
        self._validate_prompt(token_ids, params)
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
        )
        self._seeds[request_id] = (
            params.seed if params.seed is not None else int(self._seed_rng.integers(2**31 - 1))
        )
        if self.tokenizer is not None:
            self._detok[request_id] = Detokenizer(self.tokenizer, params)
        self._logprobs[request_id] = []
        self._live[request_id] = req
        self.scheduler.add_request(req)

    def abort_request(self, request_id) -> None:
        """Stop a request and free its blocks; unknown or finished ids are ignored, as in vLLM."""
        request_id = str(request_id)
        if request_id in self._live:
            self.scheduler.abort_request(request_id)
            self._forget(request_id)

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
            outputs.append(self._make_output(req))
            if req.is_finished:
                self._forget(req.request_id)
        return outputs

    def _detokenize(self, req: Request) -> None:
        """Update the request's text and end it at a stop string."""
        detok = self._detok.get(req.request_id)
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
                self._seeds[item.request.request_id],
                item.request.prompt_token_ids,
                item.request.output_token_ids,
                item.request.eos_token_ids,
            )
            for item in plan.scheduled
        ]
        arrays, flags = build_sampling_arrays(rows, batch.padded_num_seqs)
        targets, prompt_k = self._prompt_logprob_targets(plan, batch)
        result = self.runner.execute(batch, arrays, flags, targets, prompt_k)
        if prompt_k:
            self._collect_prompt_logprobs(plan, batch, result)

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
                if req.sampling_params.logprobs is not None:
                    self._logprobs[req.request_id].append(
                        self._token_logprobs(result, i, token, req.sampling_params.logprobs)
                    )
        self.num_generated_tokens += len(sampled)
        return sampled

    def _prompt_logprob_targets(self, plan, batch):
        """[T] int32 next-prompt-token targets and the top-k bucket, or (None, 0) when no
        scheduled request wants prompt_logprobs (the common case compiles without them)."""
        wanted = [item.request.sampling_params.prompt_logprobs for item in plan.scheduled]
        if all(k is None for k in wanted):
            return None, 0
        targets = np.zeros(batch.padded_num_tokens, np.int32)
        for i, item in enumerate(plan.scheduled):
            req, start = item.request, item.request.num_computed_tokens
            lo = batch.cu_q_lens[i]
            nxt = req.all_token_ids[start + 1 : start + item.num_new_tokens + 1]
            targets[lo : lo + len(nxt)] = nxt
        # At least 1: prompt_logprobs=0 still needs the step to compute the targets' logprobs.
        return targets, max(1, logprobs_bucket(max(k or 0 for k in wanted)))

    def _collect_prompt_logprobs(self, plan, batch, result) -> None:
        """Append vLLM-style prompt logprob entries ({token: Logprob}) for prompt positions seen
        for the first time; positions recomputed after a preemption are already recorded."""
        for i, item in enumerate(plan.scheduled):
            req = item.request
            k = req.sampling_params.prompt_logprobs
            if k is None:
                continue
            entries = self._prompt_logprobs.setdefault(req.request_id, [None])
            lo, start = batch.cu_q_lens[i], req.num_computed_tokens
            for j in range(item.num_new_tokens):
                pos = start + j + 1  # the prompt token whose logprob token (start + j) predicts
                if pos != len(entries) or pos >= req.num_prompt_tokens:
                    continue
                t = lo + j
                target = req.prompt_token_ids[pos]
                entries.append(self._logprob_entry(
                    result["prompt_top_token_ids"][t][:k], result["prompt_top_logprobs"][t][:k],
                    target, result["prompt_logprobs"][t],
                ))

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

    def _tokenize(self, prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(
                    "a text prompt needs a tokenizer, but this model has none; pass "
                    "{'prompt_token_ids': [...]} instead"
                )
            return prompt, list(self.tokenizer(prompt).input_ids)
        if isinstance(prompt, dict):
            if "prompt_token_ids" not in prompt:
                raise ValueError(f"a dict prompt needs 'prompt_token_ids', got keys {sorted(prompt)}")
            return prompt.get("prompt"), _as_token_list(prompt["prompt_token_ids"])
        if isinstance(prompt, (list, tuple, np.ndarray)):
            return None, _as_token_list(prompt)
        raise ValueError(
            f"prompt must be a str, a list of token ids or a dict with 'prompt_token_ids', "
            f"got {type(prompt).__name__}"
        )

    def _validate_prompt(self, token_ids: list[int], params: SamplingParams) -> None:
        vocab = self.model.config.vocab_size
        max_len = self.resolved.max_model_len
        if not token_ids:
            raise ValueError("the prompt is empty (0 tokens)")
        bad = [t for t in token_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token ids {bad[:8]} are outside the vocabulary [0, {vocab})")
        if len(token_ids) > max_len:
            raise ValueError(
                f"the prompt has {len(token_ids)} tokens, more than max_model_len={max_len}"
            )
        # The last sampled token is never written to the cache, hence the -1 (but the whole
        # prompt always is).
        needed_tokens = max(len(token_ids), min(len(token_ids) + params.max_tokens, max_len) - 1)
        needed_blocks = -(-needed_tokens // self.config.cache.block_size)
        usable = self.resolved.num_kv_blocks - 1
        if needed_blocks > usable:
            raise ValueError(
                f"the request needs {needed_blocks} KV blocks ({len(token_ids)} prompt tokens + "
                f"max_tokens={params.max_tokens}), but the whole cache has {usable}; it could never run"
            )

    def _eos_token_ids(self) -> tuple[int, ...]:
        ids = set(self.model.config.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        return tuple(sorted(ids))

    def _token_logprobs(self, result, row: int, token: int, k: int) -> dict[int, Logprob]:
        return self._logprob_entry(
            result["top_token_ids"][row][:k], result["top_logprobs"][row][:k], token,
            result["logprobs"][row],
        )

    def _logprob_entry(self, top_ids, top_lps, token: int, token_lp) -> dict[int, Logprob]:
        """{token_id: Logprob} with the top-k (rank 1 = most likely) plus `token` itself, whose
        rank is None when it is outside the top-k shown."""
        entry = {}
        for rank, (tid, lp) in enumerate(zip(top_ids.tolist(), top_lps.tolist()), start=1):
            entry[int(tid)] = Logprob(float(lp), rank, self._decode_one(int(tid)))
        if token not in entry:
            entry[token] = Logprob(float(token_lp), None, self._decode_one(token))
        return entry

    def _decode_one(self, token: int) -> str | None:
        return None if self.tokenizer is None else self.tokenizer.decode([token])

    def _make_output(self, req: Request) -> RequestOutput:
        detok = self._detok.get(req.request_id)
        logprobs = self._logprobs.get(req.request_id)
        completion = CompletionOutput(
            index=0,
            text=detok.text if detok is not None else "",
            token_ids=list(req.output_token_ids),
            cumulative_logprob=(
                sum(e[t].logprob for e, t in zip(logprobs, req.output_token_ids)) if logprobs else None
            ),
            logprobs=list(logprobs) if req.sampling_params.logprobs is not None else None,
            finish_reason=req.finish_reason,
            stop_reason=req.stop_reason,
        )
        return RequestOutput(
            request_id=req.request_id,
            prompt=req.prompt,
            prompt_token_ids=list(req.prompt_token_ids),
            prompt_logprobs=self._prompt_logprobs.get(req.request_id),
            outputs=[completion],
            finished=req.is_finished,
            metrics=req.metrics,
            error=req.error,
        )

    def _forget(self, request_id: str) -> None:
        for table in (self._live, self._seeds, self._detok, self._logprobs, self._prompt_logprobs):
            table.pop(request_id, None)

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
        }


def _as_token_list(ids) -> list[int]:
    out = []
    for t in list(ids):
        if isinstance(t, (bool, np.bool_)) or not isinstance(t, (int, np.integer)):
            raise ValueError(f"token ids must be ints, got {t!r}")
        out.append(int(t))
    return out
