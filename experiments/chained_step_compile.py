"""Start-up experiment: the step as one fused jit vs a chain of per-layer jitted calls.

    JAX_ENABLE_COMPILATION_CACHE=false python experiments/chained_step_compile.py --decode-seqs 32

The engine's step (runner.paged_step) unrolls every decoder layer into one XLA program, so each
token bucket compiles all of SmolLM2's 30 layers. The alternative measured here compiles one
decoder-layer executable per bucket and dispatches it once per layer with that layer's params
and KV cache (donated), between an embedding and a head + sampling executable. JAX dispatch is
asynchronous, so the host only enqueues the calls. Printed: the fused step's compile seconds per
bucket (from the engine's own counters while it reaches the decode state), the chain's compile +
first run, both steps' best ms, and the chain's host dispatch ms. The engine does not use the
chain itself: this was the evidence for building it (issue 10); the engine now has it as
compilation="layered" (experiments/startup_time.py measures that), so the engine here is fused.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--decode-seqs", type=int, default=32)
    p.add_argument("--reps", type=int, default=8)
    args = p.parse_args(argv)

    import jax

    from bench_vs_vllm import smollm2_f32_dir
    from profile_step import best_ms, planned_step

    from jaxllm import LLM
    from jaxllm.models import llama
    from jaxllm.runner.runner import make_paged_attention, sample_outputs

    engine = LLM(smollm2_f32_dir(), max_num_seqs=32, max_num_batched_tokens=512, max_model_len=1024,
                 skip_tokenizer_init=True, compile_cache_dir=None, compilation="fused").engine
    _, step = planned_step(engine, args.decode_seqs, 64, 128, True)  # compiles the fused buckets it meets
    run, cfg = engine.runner, engine.runner.config
    fused_compiles, fused_seconds = run.num_compilations, run.compile_seconds
    token_ids, positions, metadata, logits_indices, sampling, targets, _ = run.device_args(step)
    sampling, metadata = jax.device_put(sampling), jax.device_put(metadata)
    attention_fn, params = run._attention_fn, run.params

    @functools.partial(jax.jit, donate_argnums=(3,))
    def layer(lp, x, pos, cache, meta):
        # Layer 0's static facts stand for all: SmolLM2's layers share RoPE and have no window.
        return llama.decoder_layer(lp, cfg, x, pos, 0, cache, make_paged_attention(cfg, meta, attention_fn))

    embed = jax.jit(lambda table, ids: llama.embed(table, cfg, ids))

    @jax.jit
    def head(params, x, li, si, tg):
        x = llama.final_norm(params["final_norm"], cfg, x)
        return sample_outputs(params, cfg, x, li, si, tg, sampler=step.sampler, prompt_logprobs=False)

    caches = list(run.kv_caches)

    def chained():
        x = embed(params["embed"], token_ids)
        for i, lp in enumerate(params["layers"]):
            x, caches[i] = layer(lp, x, positions, caches[i], metadata)
        return head(params, x, logits_indices, sampling, targets)

    t0 = time.perf_counter()
    jax.block_until_ready(chained())
    chain_first = time.perf_counter() - t0
    chain_ms = best_ms(chained, args.reps)
    t0 = time.perf_counter()
    out = chained()
    dispatch_ms = 1e3 * (time.perf_counter() - t0)
    jax.block_until_ready(out)
    run.kv_caches = caches
    fused_ms = best_ms(lambda: run.execute(step), args.reps)
    result = {"fused_compiles": fused_compiles, "fused_compile_s": fused_seconds,
              "fused_compile_s_per_bucket": fused_seconds / max(1, fused_compiles),
              "chain_compile_and_first_run_s": chain_first, "chain_step_ms": chain_ms,
              "chain_dispatch_ms": dispatch_ms, "fused_step_ms": fused_ms,
              "padded_tokens": step.batch.padded_num_tokens}
    for k, v in result.items():
        print(f"{k:32s} {v:.2f}" if isinstance(v, float) else f"{k:32s} {v}")
    return result


if __name__ == "__main__":
    main()
