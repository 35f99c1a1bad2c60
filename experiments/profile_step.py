"""Where one engine step's time goes: a decode step and a prefill step, replayed and split.

    python experiments/profile_step.py                      # SmolLM2-135M fp32 (bench_vs_vllm's model)
    python experiments/profile_step.py --model DIR --decode-seqs 32 --context 128

The engine is brought to the state to replay by its own loop (add_request + step), then the
scheduler plans one more step and `Engine.build_step_inputs` builds its inputs (the one builder
the engine uses); `runner.execute` runs them repeatedly (best of --reps). The split uses jitted
pieces over the same arrays and shapes:
  full      runner.execute (forward + LM head + sampling, host transfer included)
  layers    the decoder stack with attention replaced by passing v through (matmuls, norms, RoPE)
  attention ragged paged attention of every layer on the real cache (reads only, no KV write)
  head      final LM head over the S sampled rows + greedy sampling
The replayed steps write K/V into the slots the planned step owns, so nothing else changes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def best_ms(fn, reps: int) -> float:
    import jax

    jax.block_until_ready(fn())
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def planned_step(engine, num_seqs: int, prompt_len: int, context: int, decode: bool):
    """StepInputs of the next step after driving `num_seqs` requests to the wanted state."""
    import numpy as np

    from jaxllm import SamplingParams

    rng = np.random.default_rng(0)
    vocab = engine.model.config.vocab_size
    for i in range(num_seqs):
        prompt = rng.integers(17, vocab, size=prompt_len).tolist()
        engine.add_request(f"p{i}", {"prompt_token_ids": prompt},
                           SamplingParams(max_tokens=context + 8, temperature=0.0, ignore_eos=True))
    if decode:
        # Run until every request has `context` tokens (prompt + outputs) and only decodes remain.
        sched = engine.scheduler
        while sched.num_waiting or any(r.num_tokens < context for r in sched.running):
            engine.step()
    plan = engine.scheduler.schedule()
    return plan, engine.build_step_inputs(plan.scheduled)


def split(engine, step, reps: int) -> dict:
    import jax
    import jax.numpy as jnp

    from jaxllm import sampling
    from jaxllm.models import llama

    runner, cfg = engine.runner, engine.runner.config
    out = {"full": best_ms(lambda: runner.execute(step), reps)}
    args = runner.device_args(step)
    token_ids, positions, metadata, logits_indices, sinputs, _ = [jax.device_put(a) for a in args[:6]]
    params = runner.params

    @jax.jit
    def layers_only(params, token_ids, positions):
        return llama.forward(params, cfg, token_ids, positions, None, lambda i, q, k, v, c: (q, c))[0]

    out["layers"] = best_ms(lambda: layers_only(params, token_ids, positions), reps)
    hidden = layers_only(params, token_ids, positions)
    t = token_ids.shape[0]
    q = jnp.ones((t, cfg.num_heads, cfg.head_dim), jnp.float32) * 0.01

    @jax.jit
    def attention_only(kv_caches, q, metadata):
        # Attention reads only: a KV write here would copy the (not donated) cache every layer.
        acc = jnp.zeros_like(q)
        for i, (k_cache, v_cache) in enumerate(kv_caches):
            o = runner._attention_fn(q + acc * 1e-9, k_cache, v_cache, metadata.kv_lens, metadata.block_tables,
                                     metadata.cu_q_lens, sm_scale=cfg.sm_scale,
                                     sliding_window=cfg.layer_sliding_windows[i], soft_cap=cfg.attn_logit_softcap)
            acc = acc + o  # chained so XLA cannot drop layers
        return acc

    out["attention"] = best_ms(lambda: attention_only(runner.kv_caches, q, metadata), reps)

    @jax.jit
    def head_only(params, hidden, logits_indices, sinputs):
        logits = llama.compute_logits(params, cfg, hidden[logits_indices])
        return sampling.sample(logits, sinputs, step.sampler).token_ids

    out["head"] = best_ms(lambda: head_only(params, hidden, logits_indices, sinputs), reps)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="HF directory (default: bench_vs_vllm's SmolLM2 fp32)")
    p.add_argument("--decode-seqs", type=int, default=32)
    p.add_argument("--context", type=int, default=128, help="tokens per request at the decode step")
    p.add_argument("--prefill-len", type=int, default=512)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--llm-kwargs", default="{}")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    from jaxllm import LLM

    if args.model is None:
        from bench_vs_vllm import smollm2_f32_dir

        args.model = smollm2_f32_dir()
    results = {}
    kwargs = dict(max_num_seqs=32, max_num_batched_tokens=512, max_model_len=1024, skip_tokenizer_init=True,
                  **json.loads(args.llm_kwargs))
    for name, seqs, prompt, ctx, decode in [
        ("decode", args.decode_seqs, args.context // 2, args.context, True),
        ("prefill", 1, args.prefill_len, args.prefill_len, False),
    ]:
        engine = LLM(args.model, **kwargs).engine
        plan, step = planned_step(engine, seqs, prompt, ctx, decode)
        r = split(engine, step, args.reps)
        r.update(num_tokens=step.batch.num_tokens, padded_tokens=step.batch.padded_num_tokens,
                 rows=step.batch.num_seqs, padded_rows=step.batch.padded_num_seqs,
                 kv_lens_sum=int(step.batch.kv_lens.sum()))
        results[name] = r
        print(name, json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in r.items()}), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
