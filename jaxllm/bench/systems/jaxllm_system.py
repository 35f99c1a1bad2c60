"""jaxllm as a benchmark system: LLM(...) with the config's engine settings, warm-up timed
apart, then the timed driver (bench/driver.py) sends the workload at its arrival times.
Beam-search workloads run through LLM.beam_search (offline: all prompts at once)."""

from __future__ import annotations

import time

from jaxllm.bench.driver import TimedDriver
from jaxllm.bench.metrics import request_row, request_table, step_table
from jaxllm.bench.systems import SystemResult


def engine_kwargs(cfg, workload) -> dict:
    """LLM(...) keywords from the config (max_model_len defaults to the longest request)."""
    e = cfg.engine
    kw = dict(dtype=e.dtype, block_size=e.block_size, num_kv_blocks=e.num_kv_blocks,
              kv_cache_memory_bytes=e.kv_cache_memory_bytes, max_num_seqs=e.max_num_seqs,
              max_num_batched_tokens=e.max_num_batched_tokens,
              max_model_len=e.max_model_len or workload.max_model_len,
              scheduling_policy=e.scheduling_policy, enable_chunked_prefill=e.enable_chunked_prefill,
              enable_prefix_caching=e.enable_prefix_caching, preemption_mode=e.preemption_mode,
              swap_space=e.swap_space, token_buckets=e.token_buckets, attention_backend=e.attention_backend,
              matmul_backend=e.matmul_backend,
              seed=cfg.workload.seed, skip_tokenizer_init=True)
    return kw


def sampling_params(spec, workload_cfg):
    from jaxllm import SamplingParams

    return SamplingParams(n=spec.n, temperature=workload_cfg.temperature, max_tokens=spec.output_len,
                          ignore_eos=True, seed=workload_cfg.seed if workload_cfg.temperature > 0 else None)


def run_jaxllm(model_dir: str, workload, arrivals, cfg, llm=None) -> SystemResult:
    """`llm`: an LLM to reuse (notebooks comparing settings that share one engine)."""
    from jaxllm import LLM
    from jaxllm.runner.step_io import STEP_VARIANTS

    kw = engine_kwargs(cfg, workload)
    t0 = time.perf_counter()
    llm = llm or LLM(model_dir, **kw)
    load_s = time.perf_counter() - t0
    engine = llm.engine
    wcfg = cfg.workload
    warmup_s, warmup_compilations = 0.0, 0
    if cfg.warmup:
        # Greedy n-sample runs use only the greedy step; sampling and beams (top logprobs) the general one.
        variants = STEP_VARIANTS[:1] if wcfg.temperature == 0 and not wcfg.beam_width else STEP_VARIANTS[:2]
        t0 = time.perf_counter()
        warmup_compilations = engine.warmup(step_variants=variants)
        warmup_s = time.perf_counter() - t0
    compiles_before = engine.get_stats()["num_compilations"]
    if wcfg.beam_width:
        result = _run_beams(llm, workload, wcfg)
    else:
        driver = TimedDriver(engine)
        requests = [(spec, sampling_params(spec, wcfg)) for spec in workload.requests]
        result = driver.run(requests, arrivals)
        result = (result.request_table(), result.step_table(), result.duration)
    requests, steps, duration = result
    stats = engine.get_stats()  # before the preemption-cost steps below: the run's own counters
    preemption = None
    if cfg.preemption_cost_tokens:
        from jaxllm.bench.preemption import preemption_cost

        preemption = preemption_cost(engine, cfg.preemption_cost_tokens, cfg.preemption_cost_reps,
                                     engine.model_config.vocab_size)
    info = dict(load_time_s=load_s, warmup_s=warmup_s, warmup_compilations=warmup_compilations,
                new_compilations_during_run=stats["num_compilations"] - compiles_before,
                engine_stats=stats, engine_kwargs={k: v for k, v in kw.items()},
                block_size=cfg.engine.block_size, num_kv_blocks=engine.resolved.num_kv_blocks - 1,
                kv_cache_bytes=engine.resolved.kv_cache_bytes, num_cpu_blocks=engine.resolved.num_cpu_blocks)
    if preemption is not None:
        info["preemption_cost"] = preemption
    return SystemResult("jaxllm", requests, steps, duration, info)


def _run_beams(llm, workload, wcfg):
    """All prompts' beam searches at once (LLM.beam_search takes one max_tokens, so the
    workload's output lengths must be equal). Rows carry the e2e latency of the whole search;
    a beam's one-token steps have no per-request TTFT."""
    from jaxllm.sampling_params import BeamSearchParams

    lens = set(workload.output_lens)
    if len(lens) != 1:
        raise ValueError(f"beam_width > 0 needs one output length for all requests (a fixed output_len), got {sorted(lens)[:5]}...")
    engine = llm.engine
    steps = []
    engine.add_step_observer(steps.append)
    start = engine.clock()
    try:
        outs = llm.beam_search([{"prompt_token_ids": p} for p in workload.prompts],
                               BeamSearchParams(beam_width=wcfg.beam_width, max_tokens=lens.pop(), ignore_eos=True))
    finally:
        engine.remove_step_observer(steps.append)
    end = engine.clock()
    rows = []
    for spec, out in zip(workload.requests, outs):
        best = out.sequences[0]
        got = len(best.tokens) - spec.prompt_len
        rows.append(dict(request_row(spec.request_id, spec.prompt_len, spec.output_len, None,
                                     num_output_tokens=got, arrival_time=start, origin=start,
                                     token_ids=[s.tokens[spec.prompt_len:] for s in out.sequences]),
                         finished_time=end - start, e2el=end - start,
                         error=None if got == spec.output_len else f"best beam has {got} tokens"))
    return request_table(rows), step_table(steps, origin=start), end - start
