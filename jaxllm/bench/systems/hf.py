"""transformers as benchmark peers (offline workloads: all requests at t = 0), on the same
model files as jaxllm.

hf_static: the way a user batches `model.generate` by hand. Requests in arrival order are cut into
  chunks of max_num_seqs, left-padded to the chunk's longest prompt, run greedy with
  max_new_tokens = min_new_tokens = the chunk's longest requested output and no EOS (a static
  batch runs until its longest member is done). Only each request's requested tokens count.
  One small warm-up `generate` is excluded from the timing. n > 1 and beam requests run one
  prompt at a time, `generate(num_return_sequences=n)` (sampled, temperature 0.8 when the
  workload is greedy: n greedy samples would be one) or `generate(num_beams=k)`, all
  max_new_tokens = min_new_tokens = the request's output length.
hf_continuous: `model.init_continuous_batching(...)` (the manager behind `generate_batch`), one
  request per prompt with its own max_new_tokens and EOS disabled; same page size, KV budget,
  max_batch_tokens and max_requests_per_batch as jaxllm. Its warm-up is excluded.
"""

from __future__ import annotations

import time

import numpy as np

from jaxllm.bench.metrics import request_row, request_table
from jaxllm.bench.systems import SystemResult, require_offline


def _hf_model(model_dir: str, torch_threads: int | None):
    import torch
    import transformers

    if torch_threads:
        torch.set_num_threads(torch_threads)
    return transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def _done_row(spec, finish: float, got: int | None = None) -> dict:
    """A request with only an end time known (the peer reports no per-token times)."""
    row = request_row(spec.request_id, spec.prompt_len, spec.output_len, None,
                      num_output_tokens=spec.output_len if got is None else min(got, spec.output_len),
                      arrival_time=0.0)
    row.update(finished_time=finish, e2el=finish)
    return row


def run_hf_static(model_dir: str, workload, arrivals, cfg) -> SystemResult:
    import torch

    require_offline("hf_static", cfg.workload, sharing=True)
    model = _hf_model(model_dir, cfg.torch_threads)
    if cfg.workload.n > 1 or cfg.workload.beam_width:
        return _run_hf_sharing(model, workload, cfg.workload)
    batch_size, pad = cfg.engine.max_num_seqs, 0

    def gen(prompts, n_new):
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):  # left padding: every row's last prompt token is aligned
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        with torch.no_grad():
            return model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=n_new,
                                  min_new_tokens=n_new, pad_token_id=pad, eos_token_id=None)

    gen([workload.prompts[0][:8]], 4)  # warm-up: first-call allocations, thread pools
    t0 = time.perf_counter()
    rows, batches, generated = [], [], 0
    reqs = workload.requests
    for start in range(0, len(reqs), batch_size):
        chunk = reqs[start:start + batch_size]
        prompts = [list(r.prompt_token_ids) for r in chunk]
        n_new = max(r.output_len for r in chunk)
        tb = time.perf_counter()
        out = gen(prompts, n_new)
        if out.shape[1] - max(len(p) for p in prompts) != n_new:
            raise RuntimeError(f"generate returned {out.shape[1]} columns, expected prompt + {n_new}")
        done = time.perf_counter() - t0
        generated += n_new * len(prompts)
        rows += [_done_row(r, done) for r in chunk]
        batches.append({"size": len(prompts), "max_new_tokens": n_new, "time_s": time.perf_counter() - tb,
                        "max_prompt": max(len(p) for p in prompts)})
    elapsed = time.perf_counter() - t0
    info = dict(generated_tokens_incl_wasted=generated, useful_token_frac=sum(workload.output_lens) / generated,
                num_batches=len(batches), batch_size=batch_size, batches=batches,
                kv_cache=static_kv_utilisation(workload, batch_size))
    return SystemResult("hf_static", request_table(rows), None, elapsed, info)


def _run_hf_sharing(model, workload, wcfg) -> SystemResult:
    """n samples or beams of each prompt, one prompt at a time (module docstring)."""
    import torch

    def gen(prompt, m):
        ids = torch.tensor([list(prompt)])
        with torch.no_grad():
            if wcfg.beam_width:
                return model.generate(ids, num_beams=wcfg.beam_width, do_sample=False, max_new_tokens=m,
                                      min_new_tokens=m, pad_token_id=0, eos_token_id=None)
            return model.generate(ids, do_sample=True, temperature=wcfg.temperature or 0.8,
                                  num_return_sequences=wcfg.n, max_new_tokens=m, min_new_tokens=m,
                                  pad_token_id=0, eos_token_id=None)

    gen(workload.prompts[0][:8], 2)  # warm-up, excluded
    rows, t0 = [], time.perf_counter()
    for spec in workload.requests:
        out = gen(spec.prompt_token_ids, spec.output_len)
        if out.shape[-1] != spec.prompt_len + spec.output_len:
            raise RuntimeError(f"generate returned {out.shape[-1]} columns, expected {spec.prompt_len} + {spec.output_len}")
        row = _done_row(spec, time.perf_counter() - t0)
        row["num_output_tokens"] = spec.output_len * (1 if wcfg.beam_width else wcfg.n)  # as jaxllm counts them
        rows.append(row)
    elapsed = time.perf_counter() - t0
    info = dict(mode="beam_search" if wcfg.beam_width else "parallel_sampling", n=wcfg.n, beam_width=wcfg.beam_width)
    return SystemResult("hf_static", request_table(rows), None, elapsed, info)


def static_kv_utilisation(workload, batch_size: int) -> dict:
    """KV utilisation of static batching, analytically: at decode step t of a batch, HF's cache holds
    B * (max_prompt + t) slots; a row holds useful K/V for len_i + min(t, out_i) of them
    (its left padding and the tokens after its requested output are waste). Mean over steps."""
    fills = []
    for start in range(0, workload.num_requests, batch_size):
        p = np.array(workload.prompt_lens[start:start + batch_size])
        o = np.array(workload.output_lens[start:start + batch_size])
        for t in range(o.max()):
            fills.append(np.sum(p + np.minimum(t, o)) / (len(p) * (p.max() + t)))
    return {"slot_fill_mean": float(np.mean(fills))}


def kv_bytes_per_token(cfg) -> int:
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * d * 4


def run_hf_continuous(model_dir: str, workload, arrivals, cfg) -> SystemResult:
    import transformers
    from transformers import GenerationConfig

    require_offline("hf_continuous", cfg.workload)
    model = _hf_model(model_dir, cfg.torch_threads)
    e = cfg.engine
    max_len = workload.max_model_len
    page = e.block_size
    if e.num_kv_blocks:
        num_blocks = e.num_kv_blocks - 1
    else:  # the same KV budget as jaxllm, in pages of all layers
        num_blocks = int(e.kv_cache_memory_bytes) // (page * kv_bytes_per_token(model.config))
    cb_config = transformers.ContinuousBatchingConfig(
        page_size=page, num_blocks=max(num_blocks, -(-max_len // page) + 1),
        max_batch_tokens=e.max_num_batched_tokens, max_requests_per_batch=e.max_num_seqs)
    gen_config = GenerationConfig(do_sample=False, max_new_tokens=max(workload.output_lens),
                                  eos_token_id=-1, pad_token_id=0)
    t0 = time.perf_counter()
    manager = model.init_continuous_batching(generation_config=gen_config, continuous_batching_config=cb_config)
    manager.warmup()
    warm = time.perf_counter() - t0
    manager.start()
    finish: dict[str, float] = {}
    try:
        t0 = time.perf_counter()
        ids = [manager.add_request(list(r.prompt_token_ids), request_id=f"r{r.request_id}",
                                   max_new_tokens=r.output_len, eos_token_id=-1) for r in workload.requests]
        results = {}
        deadline = time.monotonic() + cfg.hf_cb_timeout
        while len(results) < len(ids):
            r = manager.get_result(timeout=1)
            if r is not None and r.is_finished():
                results[r.request_id] = r
                finish[r.request_id] = time.perf_counter() - t0
            elif r is None and not manager.is_running():
                raise RuntimeError("transformers continuous batching thread stopped")
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {len(results)}/{len(ids)} requests done after {cfg.hf_cb_timeout}s")
        elapsed = time.perf_counter() - t0
    finally:
        manager.stop(block=True, timeout=10)
    got = [len(results[i].generated_tokens) for i in ids]
    rows = [_done_row(spec, finish[i], g) for spec, i, g in zip(workload.requests, ids, got)]
    info = dict(warmup_s=warm, lengths_match=got == workload.output_lens,
                attn_implementation=str(getattr(model.config, "_attn_implementation", None)),
                config={"page_size": page, "num_blocks": cb_config.num_blocks,
                        "max_batch_tokens": cb_config.max_batch_tokens,
                        "max_requests_per_batch": cb_config.max_requests_per_batch})
    return SystemResult("hf_continuous", request_table(rows), None, elapsed, info)
