"""Offline throughput: jaxllm vs transformers (static `generate` and continuous batching), same run.

    python experiments/bench_throughput.py                      # ~125M Llama, long-tailed workload
    python experiments/bench_throughput.py --quick              # tiny model smoke run (< 30 s)
    python experiments/bench_throughput.py --prompt-dist fixed:128 --output-dist uniform:16:256

What it does, in order (see experiments/README.md for what every number means):
  1. Measures this machine's roofline (experiments/roofline.py): f32 matmul FLOP/s, read bandwidth.
  2. Builds (once, cached) a random-init Llama checkpoint with transformers + save_pretrained.
     Random weights are fine for throughput: every request has `ignore_eos`, so lengths are exact.
  3. Samples N requests (token-id prompts, exact output lengths) from the chosen distributions.
  4. jaxllm: LLM(...), engine warm-up (compiles every token bucket; timed and reported separately,
     excluded from throughput), then one timed `generate` over all N requests. The engine is
     instrumented from outside (wrappers around its phases; no engine file is edited) to record
     per-step host/device time, padding and KV-cache occupancy.
  5. transformers static batching: requests in arrival order, chunks of max_num_seqs, left-padded,
     greedy `generate` with min_new_tokens = max_new_tokens = the chunk's longest requested output
     (a static batch runs until its longest member finishes; we force that length so EOS from
     the random model cannot shorten it). Only each request's requested output tokens count.
  6. transformers continuous batching (`init_continuous_batching`, the manager behind 5.x
     `generate_batch`), one request per prompt with its own max_new_tokens and EOS disabled.
     If it fails on this machine the error is printed and recorded, and the run continues.
  7. Replays one captured decode step and one prefill-heavy step through pieces of the jitted step
     (matmuls only / attention only / logits+sampling) to show where device time goes.
Results go to experiments/results/<name>.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import os
import platform
import sys
import time
import traceback

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from roofline import measure_roofline  # noqa: E402
from workloads import SHAREGPT_OUTPUT, SHAREGPT_PROMPT, make_workload  # noqa: E402

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

# ~138M parameters with tied embeddings (GPT-2-small-like sizes in Llama shape).
DEFAULT_MODEL = dict(vocab_size=32000, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                     num_key_value_heads=12, intermediate_size=3072, tie_word_embeddings=True)
TINY_MODEL = dict(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=128, tie_word_embeddings=False)


# ------------------------------------------------------------------------------------------ model

def build_model(model_kwargs: dict, cache_dir: str, max_position_embeddings: int = 2048, seed: int = 0) -> str:
    """Random-init LlamaForCausalLM saved as safetensors under cache_dir (built once per shape)."""
    kwargs = dict(model_kwargs, max_position_embeddings=max_position_embeddings, rms_norm_eps=1e-5,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
    tag = hashlib.sha1(json.dumps(kwargs, sort_keys=True).encode()).hexdigest()[:10]
    path = os.path.join(cache_dir, f"llama-h{kwargs['hidden_size']}-l{kwargs['num_hidden_layers']}-{tag}")
    if os.path.exists(os.path.join(path, "model.safetensors")):
        return path
    import torch
    import transformers

    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kwargs)).to(torch.float32)
    tmp = path + f".tmp{os.getpid()}"
    model.save_pretrained(tmp, safe_serialization=True)
    os.replace(tmp, path)  # atomic: concurrent runs never see a half-written dir
    return path


@dataclasses.dataclass(frozen=True)
class ModelCost:
    """Per-token costs of the model, for roofline arithmetic (f32 unless dtype_bytes says otherwise)."""

    num_params: int  # all parameters (embedding counted once when tied)
    layer_params: int  # matmul weights of the decoder layers (q,k,v,o,gate,up,down)
    lm_head_params: int  # V * H
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    dtype_bytes: int

    @classmethod
    def from_hf_config(cls, cfg, dtype_bytes: int = 4) -> "ModelCost":
        h, i, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
        nh, nkv = cfg.num_attention_heads, cfg.num_key_value_heads
        d = getattr(cfg, "head_dim", None) or h // nh
        per_layer = h * nh * d + 2 * h * nkv * d + nh * d * h + 3 * h * i
        embed = cfg.vocab_size * h
        norms = L * 2 * h + h
        total = L * per_layer + embed + norms + (0 if cfg.tie_word_embeddings else embed)
        return cls(total, L * per_layer, embed, L, nh, nkv, d, dtype_bytes)

    @property
    def weight_bytes_per_step(self) -> int:
        """Weights every step must stream: all layer matmuls + the LM head (embedding gather is T rows)."""
        return (self.layer_params + self.lm_head_params) * self.dtype_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype_bytes

    def step_cost(self, q_lens: np.ndarray, kv_lens: np.ndarray, num_sampled: int) -> tuple[float, float]:
        """(FLOPs, bytes read) of one step with the given per-sequence q_lens / kv_lens ([S] each).

        FLOPs = 2 * layer_params per token + 2 * V * H per sampled row + attention
        (QK^T and PV: 4 * nH * D per (query, visible key) pair, causal within the chunk).
        Bytes = weights once + every visible K/V once.
        """
        q = q_lens.astype(np.float64)
        k = kv_lens.astype(np.float64)
        pairs = float(np.sum(q * k - q * (q - 1) / 2))
        flops = (2.0 * self.layer_params * q.sum() + 2.0 * self.lm_head_params * num_sampled
                 + 4.0 * self.num_layers * self.num_heads * self.head_dim * pairs)
        bytes_read = self.weight_bytes_per_step + self.kv_bytes_per_token * float(k.sum())
        return flops, bytes_read


# ------------------------------------------------------------------------------------------ jaxllm

class EngineProbe:
    """Times engine phases and samples cache occupancy by wrapping the engine's callables.

    Wraps (restoring them on `close`): scheduler.schedule / scheduler.update (instance attributes),
    jaxllm.engine.prepare_batch / build_sampling_inputs (module globals the engine calls),
    runner.execute, and engine.step. Nothing in jaxllm/ is modified on disk.
    """

    def __init__(self, engine, cost: ModelCost):
        import jaxllm.engine as engine_mod

        self.engine, self.cost, self._mod = engine, cost, engine_mod
        self.steps: list[dict] = []
        self.captured: dict[str, tuple] = {}  # "decode" / "prefill" -> (StepInputs, size)
        self._cur: dict = {}
        self._orig = {
            "schedule": engine.scheduler.schedule, "update": engine.scheduler.update,
            "prepare_batch": engine_mod.prepare_batch, "build_sampling_inputs": engine_mod.build_sampling_inputs,
            "execute": engine.runner.execute, "step": engine.step,
        }
        engine.scheduler.schedule = self._timed("schedule", self._orig["schedule"])
        engine.scheduler.update = self._timed("update", self._orig["update"])
        engine_mod.prepare_batch = self._timed("prepare_batch", self._orig["prepare_batch"])
        engine_mod.build_sampling_inputs = self._timed("sampling_arrays", self._orig["build_sampling_inputs"])
        engine.runner.execute = self._execute
        engine.step = self._step

    def close(self) -> None:
        e = self.engine
        e.scheduler.schedule, e.scheduler.update = self._orig["schedule"], self._orig["update"]
        self._mod.prepare_batch = self._orig["prepare_batch"]
        self._mod.build_sampling_inputs = self._orig["build_sampling_inputs"]
        for name in ("execute", "step"):
            delattr(e.runner if name == "execute" else e, name)  # back to the class methods

    def _timed(self, name, fn):
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            self._cur[name] = self._cur.get(name, 0.0) + time.perf_counter() - t0
            return out
        return wrapper

    def _execute(self, step):
        t0 = time.perf_counter()
        out = self._orig["execute"](step)
        self._cur["execute"] = time.perf_counter() - t0
        batch = self._cur["batch"] = step.batch
        # Keep one representative batch of each kind for the phase-breakdown replay.
        decode = batch.num_tokens == batch.num_seqs
        key = "decode" if decode else "prefill"
        size = batch.num_seqs if decode else batch.num_tokens
        if key not in self.captured or size > self.captured[key][1]:
            self.captured[key] = (step, size)
        return out

    def _step(self):
        self._cur = {}
        t0 = time.perf_counter()
        outs = self._orig["step"]()
        t_step = time.perf_counter() - t0
        batch = self._cur.pop("batch", None)
        if batch is None:  # nothing scheduled
            return outs
        e = self.engine
        bm = e.block_manager
        # Tokens whose K/V sits in the cache now: num_computed_tokens of every request holding blocks.
        stored = sum(r.num_computed_tokens for r in e.scheduler.requests.values()
                     if bm.has_blocks(r.request_id))
        q_lens = np.diff(batch.cu_q_lens)[: batch.num_seqs]
        kv_lens = batch.kv_lens[: batch.num_seqs]
        num_sampled = batch.num_seqs  # the LM head runs for every real row
        flops, bytes_read = self.cost.step_cost(q_lens, kv_lens, num_sampled)
        rec = {k: v for k, v in self._cur.items()}
        rec.update(step=t_step, num_tokens=batch.num_tokens, padded_tokens=batch.padded_num_tokens,
                   num_seqs=batch.num_seqs, padded_seqs=batch.padded_num_seqs, num_sampled=num_sampled,
                   flops=flops, bytes_read=bytes_read, blocks_used=bm.num_used_blocks,
                   usable_blocks=bm.num_usable_blocks, tokens_stored=stored)
        self.steps.append(rec)
        return outs


def run_jaxllm(model_dir: str, workload, args, cost: ModelCost, roof: dict) -> dict:
    from jaxllm import LLM, SamplingParams

    max_model_len = max(p + o for p, o in zip(workload.prompt_lens, workload.output_lens))
    kw = dict(model=model_dir, dtype=args.dtype, block_size=args.block_size, max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=max_model_len,
              seed=args.seed, skip_tokenizer_init=True)
    if args.num_kv_blocks:
        kw["num_kv_blocks"] = args.num_kv_blocks
    else:
        kw["kv_cache_memory_bytes"] = int(args.kv_cache_gib * (1 << 30))
    if args.token_buckets:
        kw["token_buckets"] = tuple(int(x) for x in args.token_buckets.split(","))

    t0 = time.perf_counter()
    llm = LLM(**kw)
    t_load = time.perf_counter() - t0
    engine = llm.engine
    # Every token bucket and step variant (sampling parameters are data, not jit statics).
    t0 = time.perf_counter()
    engine.warmup()
    t_compile = time.perf_counter() - t0
    compiles_after_warmup = engine.get_stats()["num_compilations"]

    params = [SamplingParams(temperature=0.0, max_tokens=o, ignore_eos=True) for o in workload.output_lens]
    prompts = [{"prompt_token_ids": p} for p in workload.prompts]
    probe = EngineProbe(engine, cost)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - t0
    probe.close()
    stats = engine.get_stats()

    got = [len(o.outputs[0].token_ids) for o in outs]
    errors = [o.error for o in outs if getattr(o, "error", None)]
    if errors or got != workload.output_lens:
        raise RuntimeError(f"jaxllm produced wrong lengths or errors: {errors[:3]} "
                           f"{sum(g != w for g, w in zip(got, workload.output_lens))} mismatches")

    steps = probe.steps
    res = throughput(workload, elapsed)
    res.update(load_time_s=t_load, compile_time_s=t_compile,
               new_compilations_during_run=stats["num_compilations"] - compiles_after_warmup,
               engine_stats=stats, config={k: v for k, v in kw.items() if k != "model"})
    res["kv_cache"] = kv_utilisation(steps, args.block_size)
    res["steps"] = step_summary(steps, elapsed)
    res["roofline"] = roofline_fraction(steps, elapsed, cost, roof)
    res["phase_breakdown"] = replay_phases(engine, probe.captured, reps=args.replay_reps) if args.replay_reps else {}
    return res


def throughput(workload, elapsed: float, useful_tokens: int | None = None) -> dict:
    out_tokens = sum(workload.output_lens) if useful_tokens is None else useful_tokens
    return {"elapsed_s": elapsed, "requests_per_s": workload.num_requests / elapsed,
            "output_tokens_per_s": out_tokens / elapsed,
            "total_tokens_per_s": (out_tokens + sum(workload.prompt_lens)) / elapsed,
            "output_tokens": out_tokens}


def kv_utilisation(steps: list[dict], block_size: int) -> dict:
    """Means over steps (sampled after each step).

    block_usage: used blocks / usable blocks (how much of the allocated cache holds live requests).
    slot_fill: tokens stored / slots of used blocks (1 - internal fragmentation of the last blocks).
    token_usage: tokens stored / all slots of the cache (= block_usage * slot_fill).
    """
    if not steps:
        return {}
    used = np.array([s["blocks_used"] for s in steps], np.float64)
    usable = np.array([s["usable_blocks"] for s in steps], np.float64)
    stored = np.array([s["tokens_stored"] for s in steps], np.float64)
    slots_used = used * block_size
    fill = np.where(slots_used > 0, stored / np.maximum(slots_used, 1), 1.0)
    return {"block_usage_mean": float(np.mean(used / usable)), "block_usage_max": float(np.max(used / usable)),
            "slot_fill_mean": float(np.mean(fill)),
            "slot_fill_weighted": float(stored.sum() / max(slots_used.sum(), 1)),
            "token_usage_mean": float(np.mean(stored / (usable * block_size))),
            "usable_blocks": int(usable[0]), "block_size": block_size}


def step_summary(steps: list[dict], elapsed: float) -> dict:
    """Where the wall time of the timed run went (seconds, summed over steps) and padding waste."""
    if not steps:
        return {}
    keys = ("schedule", "prepare_batch", "sampling_arrays", "execute", "update")
    tot = {k: float(sum(s.get(k, 0.0) for s in steps)) for k in keys}
    t_steps = float(sum(s["step"] for s in steps))
    tot["engine_step_other"] = t_steps - sum(tot.values())  # outputs, bookkeeping inside Engine.step
    tot["outside_steps"] = elapsed - t_steps  # LLM.generate: add_request, result collection
    real = sum(s["num_tokens"] for s in steps)
    padded = sum(s["padded_tokens"] for s in steps)
    decode_steps = [s for s in steps if s["num_tokens"] == s["num_seqs"]]
    return {
        "num_steps": len(steps),
        "time_s": tot,
        "time_frac": {k: v / elapsed for k, v in tot.items()},
        "mean_step_ms": 1e3 * t_steps / len(steps),
        "mean_execute_ms": 1e3 * tot["execute"] / len(steps),
        "mean_host_ms": 1e3 * (t_steps - tot["execute"]) / len(steps),
        "mean_seqs_per_step": float(np.mean([s["num_seqs"] for s in steps])),
        "mean_tokens_per_step": real / len(steps),
        "token_padding_frac": 1 - real / padded,
        "num_decode_only_steps": len(decode_steps),
        "decode_step_ms_median": 1e3 * float(np.median([s["step"] for s in decode_steps])) if decode_steps else None,
        "decode_seqs_median": float(np.median([s["num_seqs"] for s in decode_steps])) if decode_steps else None,
        # Median decode step time by batch size: the slope is the per-sequence cost, the intercept
        # the fixed cost (weight streaming + per-step overhead) that continuous batching amortises.
        "decode_step_ms_by_seqs": _median_by_bins(decode_steps),
        # Per-step trace for offline analysis: [num_tokens, padded_tokens, num_seqs, step_ms, execute_ms].
        "trace": [[s["num_tokens"], s["padded_tokens"], s["num_seqs"], round(1e3 * s["step"], 3),
                   round(1e3 * s.get("execute", 0.0), 3)] for s in steps],
    }


def _median_by_bins(steps: list[dict], edges=(1, 2, 4, 8, 16, 32, 64, 128, 256, 1 << 30)) -> dict:
    out, lo = {}, 1
    for hi in edges:
        sel = [1e3 * s["step"] for s in steps if lo <= s["num_seqs"] <= hi]
        if sel:
            out[f"{lo}-{hi}" if hi != lo else str(lo)] = {"median_ms": float(np.median(sel)), "steps": len(sel)}
        lo = hi + 1
    return out


def roofline_fraction(steps: list[dict], elapsed: float, cost: ModelCost, roof: dict) -> dict:
    """Achieved FLOP/s and weight bandwidth vs the measured peaks.

    fraction_of_roofline = sum over steps of max(FLOPs/peak_flops, bytes/peak_bw) / wall time:
    1.0 would mean every step ran as fast as its binding resource allows.
    """
    if not steps:
        return {}
    flops = sum(s["flops"] for s in steps)
    byts = sum(s["bytes_read"] for s in steps)
    t_roof = sum(max(s["flops"] / roof["matmul_flops"], s["bytes_read"] / roof["read_bandwidth"]) for s in steps)
    t_exec = sum(s["execute"] for s in steps)
    weight_bw = len(steps) * cost.weight_bytes_per_step / elapsed
    achieved = flops / elapsed
    return {
        "model_flops": flops, "achieved_flops_per_s": achieved,
        "flops_frac_of_peak": achieved / roof["matmul_flops"],
        "weight_bandwidth_B_per_s": weight_bw,
        "weight_bw_frac_of_peak": weight_bw / roof["read_bandwidth"],
        "bytes_read": byts,
        "roofline_time_s": t_roof,
        "fraction_of_roofline": t_roof / elapsed,
        "fraction_of_roofline_device_only": t_roof / t_exec,
        "compute_bound_steps": sum(s["flops"] / roof["matmul_flops"] > s["bytes_read"] / roof["read_bandwidth"]
                                   for s in steps),
    }


def replay_phases(engine, captured: dict, reps: int = 5) -> dict:
    """Re-run captured steps through pieces of the jitted step to split device time.

    For each captured batch ("decode": the largest all-decode step; "prefill": the step with most
    tokens), median-of-`reps` wall times in ms (median: the box is shared, and min-of-parts vs
    min-of-whole does not add up) of:
      full      - runner.execute as the engine calls it (host->device, step, device->host)
      matmuls   - forward with attention replaced by identity (no KV write) + logits + sampling
      attention - write_kv + ragged_paged_attention for every layer on the same metadata
      sampling  - compute_logits + sampler on the sampled rows
    matmuls - sampling is the dense-layer part; full - matmuls - attention ~ glue and transfers.
    """
    import jax
    import jax.numpy as jnp

    from jaxllm import sampling
    from jaxllm.attention.metadata import AttentionMetadata
    from jaxllm.attention.reference import write_kv
    from jaxllm.models import llama

    runner = engine.runner
    cfg = runner.config
    attn_fn = runner._attention_fn
    out = {}

    def best(fn):
        fn()
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return 1e3 * float(np.median(ts))

    @functools.partial(jax.jit, static_argnames="sampler")
    def matmuls_only(params, token_ids, positions, logits_indices, inputs_, sampler):
        hidden, _ = llama.forward(params, cfg, token_ids, positions, None, lambda i, q, k, v, c: (q, c))
        logits = llama.compute_logits(params, cfg, hidden[logits_indices])
        return sampling.sample(logits, inputs_, sampler).token_ids

    def attention_all_layers(kv_caches, q, k, v, md):
        outs = []
        new = []
        for layer in range(cfg.num_layers):
            kc, vc = write_kv(kv_caches[layer][0], kv_caches[layer][1], k, v, md.slot_mapping)
            o = attn_fn(q, kc, vc, md.kv_lens, md.block_tables, md.cu_q_lens,
                        sm_scale=cfg.head_dim ** -0.5, sliding_window=cfg.layer_sliding_windows[layer])
            outs.append(o.sum())
            new.append((kc, vc))
        return jnp.stack(outs), new

    attention_jit = jax.jit(attention_all_layers, donate_argnums=0)

    @functools.partial(jax.jit, static_argnames="sampler")
    def sampling_only(params, hidden, inputs_, sampler):
        return sampling.sample(llama.compute_logits(params, cfg, hidden), inputs_, sampler).token_ids

    for name, (step, _) in captured.items():
        batch, sampler = step.batch, step.sampler
        inputs_ = step.sampling.with_neutral_arrays(engine.resolved.max_model_len, cfg.vocab_size)
        md = AttentionMetadata(slot_mapping=batch.slot_mapping, block_tables=batch.block_tables,
                               kv_lens=batch.kv_lens, cu_q_lens=batch.cu_q_lens)
        T = batch.padded_num_tokens
        key = jax.random.PRNGKey(0)
        dt = runner.params["embed"].dtype
        q = jax.random.normal(key, (T, cfg.num_heads, cfg.head_dim), dt)
        k = jax.random.normal(key, (T, cfg.num_kv_heads, cfg.head_dim), dt)
        hidden = jax.random.normal(key, (batch.padded_num_seqs, cfg.hidden_size), dt)

        def run_attention():
            res, runner.kv_caches = attention_jit(runner.kv_caches, q, k, k, md)
            res.block_until_ready()

        r = {
            "num_tokens": batch.num_tokens, "padded_tokens": T, "num_seqs": batch.num_seqs,
            "padded_seqs": batch.padded_num_seqs, "sum_kv_lens": int(batch.kv_lens.sum()),
            # The real engine path; the KV it writes lands on slots the batch already owned (or the
            # sink), and those requests are finished by now, so this is harmless.
            "full_ms": best(lambda: runner.execute(step)),
            "matmuls_ms": best(lambda: matmuls_only(runner.params, batch.token_ids, batch.positions,
                                                    batch.logits_indices, inputs_, sampler).block_until_ready()),
            "attention_ms": best(run_attention),
            "sampling_ms": best(lambda: sampling_only(runner.params, hidden, inputs_, sampler).block_until_ready()),
        }
        r["dense_layers_ms"] = r["matmuls_ms"] - r["sampling_ms"]
        r["other_ms"] = r["full_ms"] - r["matmuls_ms"] - r["attention_ms"]
        out[name] = r
    return out


# ------------------------------------------------------------------------------------------ transformers

def _hf_model(model_dir: str):
    import torch
    import transformers

    if _TORCH_THREADS[0]:
        torch.set_num_threads(_TORCH_THREADS[0])
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return model.eval()


_TORCH_THREADS = [None]  # set by main() from --torch-threads


def run_hf_static(model_dir: str, workload, batch_size: int) -> dict:
    """transformers `generate` in static batches; see the module docstring (step 5) for the rules."""
    import torch

    model = _hf_model(model_dir)
    pad = 0

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
    batches, generated = [], 0
    for start in range(0, workload.num_requests, batch_size):
        prompts = workload.prompts[start:start + batch_size]
        n_new = max(workload.output_lens[start:start + batch_size])
        tb = time.perf_counter()
        out = gen(prompts, n_new)
        print(f"  batch {start // batch_size}: {len(prompts)} x {n_new} new tokens, "
              f"{time.perf_counter() - tb:.1f} s", flush=True)
        assert out.shape[1] - max(len(p) for p in prompts) == n_new
        generated += n_new * len(prompts)
        batches.append({"size": len(prompts), "max_new_tokens": n_new, "time_s": time.perf_counter() - tb,
                        "max_prompt": max(len(p) for p in prompts)})
    elapsed = time.perf_counter() - t0
    res = throughput(workload, elapsed)
    res.update(generated_tokens_incl_wasted=generated,
               useful_token_frac=sum(workload.output_lens) / generated,
               num_batches=len(batches), batch_size=batch_size, batches=batches,
               kv_cache=static_kv_utilisation(workload, batch_size))
    return res


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


def run_hf_continuous(model_dir: str, workload, args) -> dict:
    """transformers continuous batching (the manager behind `generate_batch`), per-request lengths."""
    import torch
    import transformers
    from transformers import GenerationConfig

    model = _hf_model(model_dir)
    max_len = max(p + o for p, o in zip(workload.prompt_lens, workload.output_lens))
    page = args.block_size
    cb_config = transformers.ContinuousBatchingConfig(
        page_size=page,
        # Same KV budget as jaxllm, in pages of all layers.
        num_blocks=max(int(args.kv_cache_gib * (1 << 30)) // (page * _kv_bytes_per_token(model.config)),
                       -(-max_len // page) + 1),
        max_batch_tokens=args.max_num_batched_tokens,
        max_requests_per_batch=args.max_num_seqs,
    )
    gen_config = GenerationConfig(do_sample=False, max_new_tokens=max(workload.output_lens),
                                  eos_token_id=-1, pad_token_id=0)
    t0 = time.perf_counter()
    manager = model.init_continuous_batching(generation_config=gen_config, continuous_batching_config=cb_config)
    manager.warmup()
    t_warm = time.perf_counter() - t0
    manager.start()
    try:
        t0 = time.perf_counter()
        ids = [manager.add_request(p, request_id=f"r{i}", max_new_tokens=o, eos_token_id=-1)
               for i, (p, o) in enumerate(zip(workload.prompts, workload.output_lens))]
        results = {}
        deadline = time.monotonic() + args.hf_cb_timeout
        while len(results) < len(ids):
            r = manager.get_result(timeout=1)
            if r is not None and r.is_finished():
                results[r.request_id] = r
            elif r is None and not manager.is_running():
                raise RuntimeError("transformers continuous batching thread stopped")
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {len(results)}/{len(ids)} requests done after {args.hf_cb_timeout}s")
        elapsed = time.perf_counter() - t0
    finally:
        manager.stop(block=True, timeout=10)
    got = [len(results[i].generated_tokens) for i in ids]
    useful = int(sum(min(g, o) for g, o in zip(got, workload.output_lens)))
    res = throughput(workload, elapsed, useful_tokens=useful)
    res.update(warmup_s=t_warm, lengths_match=got == workload.output_lens,
               attn_implementation=str(getattr(model.config, "_attn_implementation", None)),
               config={"page_size": page, "num_blocks": cb_config.num_blocks,
                       "max_batch_tokens": cb_config.max_batch_tokens,
                       "max_requests_per_batch": cb_config.max_requests_per_batch})
    return res


def _kv_bytes_per_token(cfg) -> int:
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * d * 4


# ------------------------------------------------------------------------------------------ main

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny model, 8 requests: a smoke test (< 30 s)")
    p.add_argument("--num-requests", "-n", type=int, default=None, help="default 64 (8 with --quick)")
    p.add_argument("--prompt-dist", default=None, help=f"default {SHAREGPT_PROMPT} (see workloads.py)")
    p.add_argument("--output-dist", default=None, help=f"default {SHAREGPT_OUTPUT}")
    p.add_argument("--seed", type=int, default=0)
    # Model shape (Llama); defaults ~138M params (tied embeddings).
    p.add_argument("--hidden-size", type=int, default=None)
    p.add_argument("--num-layers", type=int, default=None)
    p.add_argument("--num-heads", type=int, default=None)
    p.add_argument("--num-kv-heads", type=int, default=None)
    p.add_argument("--intermediate-size", type=int, default=None)
    p.add_argument("--vocab-size", type=int, default=None)
    p.add_argument("--untied", action="store_true", help="separate lm_head (default: tied embeddings)")
    p.add_argument("--model-cache-dir", default=os.path.expanduser("~/.cache/jaxllm/bench_models"))
    # Engine.
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--max-num-seqs", type=int, default=None, help="default 32 (4 with --quick); also HF batch size")
    p.add_argument("--max-num-batched-tokens", type=int, default=None, help="default 512 (64 with --quick)")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--kv-cache-gib", type=float, default=None, help="KV budget; default 1.0 (0.01 with --quick)")
    p.add_argument("--num-kv-blocks", type=int, default=None, help="overrides --kv-cache-gib")
    p.add_argument("--token-buckets", default=None, help="comma-separated, e.g. 32,128,512")
    # Peers.
    p.add_argument("--skip-hf-static", action="store_true")
    p.add_argument("--skip-hf-cb", action="store_true")
    p.add_argument("--hf-cb-timeout", type=float, default=1800.0)
    p.add_argument("--torch-threads", type=int, default=None,
                   help="torch.set_num_threads for the transformers runs (default: torch's own choice). "
                        "On a box shared with other jobs, OpenMP spin-waiting with 2 threads can be many "
                        "times slower than 1 thread; this flag makes that visible and controllable")
    p.add_argument("--replay-reps", type=int, default=None,
                   help="reps of the phase-breakdown replay; 0 skips it (default 7; 0 with --quick)")
    p.add_argument("--peak-gflops", type=float, default=None,
                   help="use this matmul peak for roofline fractions instead of the measured one")
    p.add_argument("--peak-gbps", type=float, default=None, help="likewise for the read bandwidth (GB/s)")
    p.add_argument("--out", default=None, help="results JSON path (default experiments/results/<auto>.json)")
    args = p.parse_args(argv)

    q = args.quick
    model = dict(TINY_MODEL if q else DEFAULT_MODEL)
    for flag, key in (("hidden_size", "hidden_size"), ("num_layers", "num_hidden_layers"),
                      ("num_heads", "num_attention_heads"), ("intermediate_size", "intermediate_size"),
                      ("vocab_size", "vocab_size")):
        if getattr(args, flag) is not None:
            model[key] = getattr(args, flag)
    model["num_key_value_heads"] = args.num_kv_heads or (model["num_key_value_heads"] if args.num_heads is None
                                                         else model["num_attention_heads"])
    if args.untied:
        model["tie_word_embeddings"] = False
    args.model = model

    def default(name, normal, quick):
        if getattr(args, name) is None:
            setattr(args, name, quick if q else normal)

    default("num_requests", 64, 8)
    default("prompt_dist", SHAREGPT_PROMPT, "uniform:4:24")
    default("output_dist", SHAREGPT_OUTPUT, "lognormal:8:0.8:2:32")
    default("max_num_seqs", 32, 4)
    default("max_num_batched_tokens", 512, 64)
    default("kv_cache_gib", 1.0, 0.01)
    if q and args.token_buckets is None:
        args.token_buckets = "16,64"  # two buckets: fewer compiles keep the smoke run short
    if args.replay_reps is None:
        # The replay compiles three extra functions per captured batch (~20 s for the tiny model on
        # a busy 2-core box), so the smoke run skips it unless asked for.
        args.replay_reps = 0 if q else 7
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    import transformers

    _TORCH_THREADS[0] = args.torch_threads
    t_start = time.perf_counter()
    print("measuring roofline ...", flush=True)
    roof = measure_roofline(matmul_n=512 if args.quick else 2048, bw_bytes=(16 if args.quick else 256) << 20,
                            reps=2 if args.quick else 5)
    print(f"  matmul {roof['matmul_flops'] / 1e9:.1f} GFLOP/s, read bandwidth {roof['read_bandwidth'] / 1e9:.1f} GB/s")
    # On a shared box the measured peaks are themselves depressed by other processes; fixed peaks
    # (e.g. measured on an idle machine) make runs comparable.
    if args.peak_gflops:
        roof = dict(roof, measured_matmul_flops=roof["matmul_flops"], matmul_flops=args.peak_gflops * 1e9)
    if args.peak_gbps:
        roof = dict(roof, measured_read_bandwidth=roof["read_bandwidth"], read_bandwidth=args.peak_gbps * 1e9)

    model_dir = build_model(args.model, args.model_cache_dir)
    hf_cfg = transformers.AutoConfig.from_pretrained(model_dir)
    cost = ModelCost.from_hf_config(hf_cfg, dtype_bytes=4 if args.dtype == "float32" else 2)
    workload = make_workload(args.num_requests, args.prompt_dist, args.output_dist, hf_cfg.vocab_size, args.seed)
    wsum = workload.summary()
    print(f"model {model_dir} ({cost.num_params / 1e6:.1f}M params)")
    print(f"workload: {args.num_requests} requests, prompts {workload.prompt_dist} "
          f"(mean {wsum['prompt_len']['mean']:.0f}, max {wsum['prompt_len']['max']}), outputs {workload.output_dist} "
          f"(mean {wsum['output_len']['mean']:.0f}, max {wsum['output_len']['max']})", flush=True)

    results = {
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "command": " ".join([os.path.basename(sys.argv[0])] + (sys.argv[1:] if argv is None else list(argv))),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                    "torch_threads": args.torch_threads,
                    "loadavg_at_start": os.getloadavg()},
        "model": {"dir": model_dir, "hf_config": args.model, "num_params": cost.num_params,
                  "weight_bytes_per_step": cost.weight_bytes_per_step, "dtype": args.dtype},
        "workload": wsum,
        "roofline": roof,
    }

    out = args.out or os.path.join(
        RESULTS_DIR, f"throughput_{'quick' if args.quick else 'h%d_l%d' % (args.model['hidden_size'], args.model['num_hidden_layers'])}"
                     f"_n{args.num_requests}_{workload.output_dist.split(':')[0]}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)

    def save(results):
        # Rewritten after every system, so a long run that dies (or is stopped) keeps what it measured.
        with open(out, "w") as f:
            json.dump(results, f, indent=2, default=_json_default)

    print("jaxllm ...", flush=True)
    results["jaxllm"] = run_jaxllm(model_dir, workload, args, cost, roof)
    save(results)
    j = results["jaxllm"]
    print(f"  {j['output_tokens_per_s']:.1f} out tok/s, {j['requests_per_s']:.2f} req/s "
          f"(compile {j['compile_time_s']:.1f}s excluded)", flush=True)

    peers = []
    if not args.skip_hf_static:
        print("transformers static generate ...", flush=True)
        results["hf_static"] = run_hf_static(model_dir, workload, args.max_num_seqs)
        peers.append("hf_static")
        print(f"  {results['hf_static']['output_tokens_per_s']:.1f} out tok/s", flush=True)
        save(results)
    if not args.skip_hf_cb:
        print("transformers continuous batching ...", flush=True)
        try:
            results["hf_continuous"] = run_hf_continuous(model_dir, workload, args)
            peers.append("hf_continuous")
            print(f"  {results['hf_continuous']['output_tokens_per_s']:.1f} out tok/s", flush=True)
        except Exception as e:  # a peer failing must not lose the rest of the run
            msg = f"{type(e).__name__}: {e}"
            print(f"  transformers continuous batching failed: {msg}", flush=True)
            results["hf_continuous"] = {"error": msg, "traceback": traceback.format_exc(limit=5)}
    results["ratios"] = {f"jaxllm_vs_{p}": j["output_tokens_per_s"] / results[p]["output_tokens_per_s"]
                         for p in peers}
    results["machine"]["loadavg_at_end"] = os.getloadavg()
    results["total_bench_time_s"] = time.perf_counter() - t_start

    save(results)
    print_report(results)
    print(f"wrote {out}")
    results["_path"] = out
    return results


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def print_report(r: dict) -> None:
    j = r["jaxllm"]
    print("\n=== throughput (output tokens/s; only requested tokens count) ===")
    rows = [("jaxllm", j)] + [(k, r[k]) for k in ("hf_static", "hf_continuous") if k in r and "error" not in r[k]]
    for name, x in rows:
        print(f"  {name:14s} {x['output_tokens_per_s']:9.1f} tok/s  {x['requests_per_s']:7.3f} req/s  "
              f"{x['elapsed_s']:7.1f} s")
    for k, v in r["ratios"].items():
        print(f"  {k}: {v:.2f}x")
    kv = j["kv_cache"]
    print(f"KV cache: block usage {kv['block_usage_mean']:.1%} (max {kv['block_usage_max']:.1%}), "
          f"slot fill {kv['slot_fill_mean']:.1%}"
          + (f"; HF static slot fill {r['hf_static']['kv_cache']['slot_fill_mean']:.1%}" if "hf_static" in r else ""))
    rf = j["roofline"]
    print(f"roofline: {rf['achieved_flops_per_s'] / 1e9:.1f} GFLOP/s ({rf['flops_frac_of_peak']:.1%} of peak), "
          f"weights {rf['weight_bandwidth_B_per_s'] / 1e9:.1f} GB/s ({rf['weight_bw_frac_of_peak']:.1%} of peak), "
          f"fraction of roofline {rf['fraction_of_roofline']:.1%} (device-only {rf['fraction_of_roofline_device_only']:.1%})")
    st = j["steps"]
    print(f"steps: {st['num_steps']}, mean {st['mean_step_ms']:.1f} ms (execute {st['mean_execute_ms']:.1f}, "
          f"host {st['mean_host_ms']:.1f}), {st['mean_seqs_per_step']:.1f} seqs/step, "
          f"token padding {st['token_padding_frac']:.1%}")
    print("  time fractions: " + ", ".join(f"{k} {v:.1%}" for k, v in st["time_frac"].items()))
    for name, ph in j["phase_breakdown"].items():
        print(f"  replay {name} (T={ph['num_tokens']}/{ph['padded_tokens']}, S={ph['num_seqs']}): full "
              f"{ph['full_ms']:.1f} ms = dense {ph['dense_layers_ms']:.1f} + attention {ph['attention_ms']:.1f} "
              f"+ logits/sampling {ph['sampling_ms']:.1f} + other {ph['other_ms']:.1f}")
    print(f"compile (warm-up) {j['compile_time_s']:.1f} s, new compilations during run: "
          f"{j['new_compilations_during_run']}")


if __name__ == "__main__":
    main()
