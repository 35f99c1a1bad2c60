"""LLM: the offline API, as in vLLM.

    llm = LLM(model="smollm2-135m-instruct")
    outputs = llm.generate(["Hello"], SamplingParams(max_tokens=32))

Bad prompts: `generate` does not raise for one bad prompt among many. Every prompt is validated
before any runs; the good ones run to completion and each bad one comes back as a finished
RequestOutput with `error` set (the message names the bad value) and finish_reason "error", so
one bad request never costs the others their results. A warning lists the failures.
Bad engine arguments (LLM(...)) raise ValueError at once.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

from jaxllm.beam_search import BeamSearchOutput, run_beam_search
from jaxllm.config import DEFAULT_COMPILE_CACHE_DIR, CacheConfig, EngineConfig, ParallelConfig, SchedulerConfig
from jaxllm.engine import Engine
from jaxllm.inputs import chat_prompt
from jaxllm.request import CompletionOutput, RequestOutput
from jaxllm.sampling_params import BeamSearchParams, SamplingParams


class LLM:
    def __init__(
        self,
        model: str,
        dtype: str = "float32",
        block_size: int = 16,
        num_kv_blocks: int | None = None,
        kv_cache_memory_bytes: int | None = None,
        max_num_seqs: int = 64,
        max_num_batched_tokens: int = 512,
        max_model_len: int | None = None,
        scheduling_policy="fcfs",
        enable_chunked_prefill: bool = True,
        seed: int = 0,
        attention_backend: str = "auto",
        matmul_backend: str = "auto",
        tensor_parallel_size: int = 1,
        pipeline_parallel_size: int = 1,
        pipeline_layer_partition: tuple[int, ...] | None = None,
        pipeline_overlap_host: bool = False,
        token_buckets: tuple[int, ...] | None = None,
        skip_tokenizer_init: bool = False,
        enable_prefix_caching: bool = True,
        preemption_mode: str = "recompute",
        swap_space: float = 4,
        compile_cache_dir: str | None = DEFAULT_COMPILE_CACHE_DIR,
        gpu_memory_utilization: float = 0.9,
        batch_invariant: bool = False,
        compilation: str | None = None,
        async_scheduling: bool = False,
    ):
        config = EngineConfig(
            model=model,
            dtype=dtype,
            seed=seed,
            attention_backend=attention_backend,
            matmul_backend=matmul_backend,
            cache=CacheConfig(
                block_size=block_size,
                num_kv_blocks=num_kv_blocks,
                kv_cache_memory_bytes=kv_cache_memory_bytes,
                enable_prefix_caching=enable_prefix_caching,
                swap_space=swap_space,
                gpu_memory_utilization=gpu_memory_utilization,
            ),
            scheduler=SchedulerConfig(
                max_num_seqs=max_num_seqs,
                max_num_batched_tokens=max_num_batched_tokens,
                max_model_len=max_model_len,
                scheduling_policy=scheduling_policy,
                enable_chunked_prefill=enable_chunked_prefill,
                preemption_mode=preemption_mode,
            ),
            parallel=ParallelConfig(tensor_parallel_size=tensor_parallel_size,
                                    pipeline_parallel_size=pipeline_parallel_size,
                                    pipeline_layer_partition=pipeline_layer_partition,
                                    pipeline_overlap_host=pipeline_overlap_host),
            token_buckets=token_buckets,
            skip_tokenizer_init=skip_tokenizer_init,
            compile_cache_dir=compile_cache_dir,
            batch_invariant=batch_invariant,
            compilation=compilation,
            async_scheduling=async_scheduling,
        )
        self.engine = Engine(config)
        self._next_id = 0

    def get_tokenizer(self):
        return self.engine.tokenizer

    def get_stats(self) -> dict:
        return self.engine.get_stats()

    def reset_prefix_cache(self) -> bool:
        """Forget the prefix cache's content; False while requests hold blocks (as vLLM)."""
        return self.engine.reset_prefix_cache()

    def generate(
        self,
        prompts,
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        priority: Sequence[int] | None = None,
    ) -> list[RequestOutput]:
        """Generate completions; returns one RequestOutput per prompt, in input order.

        prompts: a string, a list of strings, a dict {"prompt_token_ids": [...]}, or a list of dicts
          (a dict may carry "cache_salt": prompts with different salts share no cached KV blocks).
        sampling_params: one SamplingParams for all prompts, or one per prompt.
        priority: per-prompt priorities for the "priority" policy (lower runs first).
        """
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        prompts = list(prompts)
        params = self._params_per_prompt(sampling_params, len(prompts))
        if priority is not None and len(priority) != len(prompts):
            raise ValueError(f"got {len(priority)} priorities for {len(prompts)} prompts")

        ids, results, errors = [], {}, []
        for i, (prompt, p) in enumerate(zip(prompts, params)):
            request_id = str(self._next_id)
            self._next_id += 1
            ids.append(request_id)
            try:
                self.engine.add_request(
                    request_id, prompt, p, priority=0 if priority is None else priority[i]
                )
            except ValueError as e:
                results[request_id] = _error_output(request_id, prompt, str(e))
                errors.append(f"prompt {i}: {e}")
        if errors:
            warnings.warn(f"{len(errors)} of {len(prompts)} prompts were refused: " + "; ".join(errors))

        bar = _progress_bar(len(ids) - len(errors), use_tqdm)
        while self.engine.has_unfinished_requests():
            for out in self.engine.step():
                if out.finished:
                    results[out.request_id] = out
                    if bar is not None:
                        bar.update(1)
        if bar is not None:
            bar.close()
        return [results[i] for i in ids]

    def beam_search(self, prompts, params: BeamSearchParams) -> list[BeamSearchOutput]:
        """Beam search (vLLM's LLM.beam_search): one BeamSearchOutput per prompt, its sequences
        best first. prompts: as for generate. Beams share KV blocks through the prefix cache; see
        jaxllm/beam_search.py for the semantics. Raises ValueError for a bad prompt or params."""
        if not isinstance(params, BeamSearchParams):
            raise ValueError(f"params must be a BeamSearchParams, got {type(params).__name__}")
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        # The beams of a prompt run side by side, like n samples: refuse what could never fit.
        as_samples = SamplingParams(n=params.beam_width, max_tokens=params.max_tokens)
        token_ids = []
        for i, prompt in enumerate(prompts):
            try:
                token_ids.append(self.engine.check_prompt(prompt, as_samples)[1])
            except ValueError as e:
                raise ValueError(f"prompt {i}: {e}") from None
        return run_beam_search(self, token_ids, params, self.engine.eos_token_ids(),
                               self.engine.resolved.max_model_len)

    def chat(self, messages, sampling_params=None, use_tqdm: bool = True,
             add_generation_prompt: bool = True) -> list[RequestOutput]:
        """Generate replies to conversations, formatted by the model's chat template.

        messages: one conversation (a list of {"role", "content"} dicts) or a list of them.
        """
        tokenizer = self.engine.tokenizer
        if tokenizer is None or getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("this model has no tokenizer with a chat template; use generate()")
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = [chat_prompt(tokenizer, conv, add_generation_prompt) for conv in conversations]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    @staticmethod
    def _params_per_prompt(sampling_params, n: int) -> list[SamplingParams]:
        if sampling_params is None:
            return [SamplingParams()] * n
        if isinstance(sampling_params, SamplingParams):
            return [sampling_params] * n
        sampling_params = list(sampling_params)
        if len(sampling_params) != n:
            raise ValueError(f"got {len(sampling_params)} SamplingParams for {n} prompts")
        return sampling_params


def _error_output(request_id: str, prompt, message: str) -> RequestOutput:
    text = prompt if isinstance(prompt, str) else (prompt.get("prompt") if isinstance(prompt, dict) else None)
    ids = prompt.get("prompt_token_ids") if isinstance(prompt, dict) else None
    return RequestOutput(
        request_id=request_id,
        prompt=text,
        prompt_token_ids=list(ids) if isinstance(ids, (list, tuple)) else None,
        prompt_logprobs=None,
        outputs=[CompletionOutput(index=0, text="", token_ids=[], cumulative_logprob=None,
                                  logprobs=None, finish_reason="error", stop_reason=None)],
        finished=True,
        metrics=None,
        error=message,
    )


def _progress_bar(total: int, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc="Processed prompts", dynamic_ncols=True)
