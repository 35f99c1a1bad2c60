"""Recompute vs swap preemption across block sizes (the PagedAttention paper's Fig. 19), in one run.

    python experiments/bench_preemption.py [--block-sizes 8,16,32,64,128,256] [--out results/x.json]
    python experiments/bench_preemption.py --quick        # tiny model, two block sizes (smoke test)

Model: a random Llama (bench_throughput.build_model; default hidden 256, 4 layers, fp32). The KV
cache holds the same number of tokens at every block size, and the workload (N requests, prompts
uniform in [lo, hi], fixed outputs, greedy) needs about three times that, so requests are
preempted again and again. For each block size, all in one process:

  per-preemption cost (micro, the victim = one request with `victim_tokens` computed tokens):
    swap_ms        runner.swap of its blocks out and back in (two jitted copies, device <-> pinned_host)
    recompute_ms   the step that computes its tokens again (one prefill of victim_tokens tokens)
    swap_over_recompute = swap_ms / recompute_ms  (< 1: swapping this victim is cheaper)
    swap_copy_bw_fraction    bytes copied (read + written, both directions) / swap time / the
                             roofline's copy bandwidth
    recompute_roofline_fraction  the prefill step's roofline time (max of FLOPs / peak matmul and
                             weight bytes / read bandwidth) / its measured time
  end to end (the whole workload, engine.generate):
    output_tokens_per_s per mode, swap_over_recompute throughput ratio, preemptions, swaps,
    blocks copied, fallbacks

On a CPU "device" and pinned_host are the same DRAM, so a swap is a memcpy; on an accelerator it
crosses PCIe and the ratio moves towards recompute. Timings take the median of --reps.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "experiments"))

MODEL = dict(vocab_size=4096, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
             num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False)
QUICK_MODEL = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny model, block sizes 16 and 64, 8 requests")
    p.add_argument("--block-sizes", default=None, help="comma-separated (default 8,16,32,64,128,256)")
    p.add_argument("-n", "--num-requests", type=int, default=None)
    p.add_argument("--cache-tokens", type=int, default=None, help="KV-cache capacity in tokens (all block sizes)")
    p.add_argument("--output-len", type=int, default=None)
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model-cache-dir", default=os.path.expanduser("~/.cache/jaxllm/bench_models"))
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    q = args.quick
    defaults = dict(block_sizes="16,64" if q else "8,16,32,64,128,256", num_requests=8 if q else 24,
                    cache_tokens=256 if q else 1024, output_len=24 if q else 96, reps=3 if q else 5)
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.block_sizes = [int(b) for b in str(args.block_sizes).split(",")]
    args.model = QUICK_MODEL if q else MODEL
    # Prompts and the largest step: a victim's recompute is one step of max_num_batched_tokens.
    args.prompt_lo, args.prompt_hi = (16, 64) if q else (32, 224)
    args.max_num_batched_tokens = 128 if q else 256
    args.max_model_len = 256 if q else 512
    return args


def make_llm(model_dir: str, args, block_size: int, mode: str):
    from jaxllm import LLM

    return LLM(model_dir, block_size=block_size, num_kv_blocks=args.cache_tokens // block_size + 1,
               max_num_seqs=16, max_num_batched_tokens=args.max_num_batched_tokens,
               max_model_len=args.max_model_len, token_buckets=(16, 64, args.max_num_batched_tokens),
               preemption_mode=mode, swap_space=1, skip_tokenizer_init=True)


def end_to_end(llm, prompts, output_len: int) -> dict:
    from jaxllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    before = llm.get_stats()["num_compilations"]
    t0 = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    elapsed = time.perf_counter() - t0
    stats = llm.get_stats()
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    assert tokens == output_len * len(prompts)
    keys = ("num_preemptions", "num_swap_outs", "num_swap_ins", "num_blocks_swapped_out",
            "num_blocks_swapped_in", "num_swap_fallbacks", "num_steps")
    return {"elapsed_s": elapsed, "output_tokens_per_s": tokens / elapsed,
            "new_compilations": stats["num_compilations"] - before,
            **{k: stats[k] for k in keys}, "_tokens": [o.outputs[0].token_ids for o in outs]}


def per_preemption(recompute_llm, swap_llm, victim_tokens: int, cost, roof: dict, reps: int) -> dict:
    """Micro costs of preempting one victim with victim_tokens computed tokens, both ways."""
    import jax
    from bench_sampler import best_ms as median_ms  # one warm call, then the median of reps (ms)
    from roofline import roofline_time

    from jaxllm import SamplingParams

    # Recompute: the step that computes the victim's tokens again (scheduled, timed, never updated).
    engine = recompute_llm.engine
    prompt = list(range(3, 3 + victim_tokens))
    engine.add_request("victim", {"prompt_token_ids": prompt}, SamplingParams(temperature=0.0, max_tokens=1))
    plan = engine.scheduler.schedule()
    assert [(x.request_id, x.num_new_tokens) for x in plan.scheduled] == [("victim", victim_tokens)]
    step = engine.build_step_inputs(plan.scheduled)
    recompute_ms = median_ms(lambda: engine.runner.execute(step), reps)
    engine.abort_request("victim")
    flops, weight_bytes = cost.step_cost(np.array([victim_tokens]), np.array([victim_tokens]), 1)

    # Swap: its blocks out to the host pool and back, over distinct block ids.
    runner = swap_llm.engine.runner
    bs = swap_llm.engine.config.cache.block_size
    n = -(-victim_tokens // bs)
    pairs = [(1 + i, 1 + i) for i in range(n)]

    def swap_round_trip():
        runner.swap(pairs, [])
        jax.block_until_ready(runner.host_caches)
        runner.swap([], pairs)
        jax.block_until_ready(runner.kv_caches)

    swap_ms = median_ms(swap_round_trip, reps)
    copied = 2 * 2 * n * swap_llm.engine.resolved.bytes_per_block  # out + in, each read + written
    return {
        "victim_tokens": victim_tokens,
        "victim_blocks": n,
        "swap_ms": swap_ms,
        "recompute_ms": recompute_ms,
        "swap_over_recompute": swap_ms / recompute_ms,
        "swap_copy_bw_fraction": copied / (swap_ms / 1e3) / roof["copy_bandwidth"],
        "recompute_roofline_fraction": roofline_time(flops, weight_bytes, roof) / (recompute_ms / 1e3),
    }


def run_block_size(model_dir: str, args, block_size: int, prompts, cost, roof: dict) -> dict:
    from jaxllm.runner.sampling_inputs import GREEDY

    llms = {mode: make_llm(model_dir, args, block_size, mode) for mode in ("recompute", "swap")}
    t0 = time.perf_counter()
    for llm in llms.values():  # both share the steps (same shapes); swap adds its copies
        llm.engine.warmup(step_variants=((GREEDY, False),))
    compile_s = time.perf_counter() - t0
    e2e = {mode: end_to_end(llm, prompts, args.output_len) for mode, llm in llms.items()}
    identical = e2e["recompute"].pop("_tokens") == e2e["swap"].pop("_tokens")
    micro = per_preemption(llms["recompute"], llms["swap"], args.max_num_batched_tokens, cost, roof, args.reps)
    return {
        "block_size": block_size,
        "num_kv_blocks": args.cache_tokens // block_size,
        "num_cpu_blocks": llms["swap"].get_stats()["num_cpu_blocks"],
        "compile_s": compile_s,
        "per_preemption": micro,
        "end_to_end": e2e,
        "throughput_swap_over_recompute": e2e["swap"]["output_tokens_per_s"] / e2e["recompute"]["output_tokens_per_s"],
        "tokens_identical": identical,
    }


def main(argv=None) -> dict:
    args = parse_args(argv)
    import transformers

    import bench_throughput
    from roofline import measure_roofline

    roof = measure_roofline(matmul_n=512, bw_bytes=32 << 20, reps=3) if args.quick else measure_roofline()
    print(f"roofline: {roof['matmul_flops'] / 1e9:.0f} GFLOP/s matmul, {roof['read_bandwidth'] / 1e9:.1f} GB/s read, "
          f"{roof['copy_bandwidth'] / 1e9:.1f} GB/s copy")
    model_dir = bench_throughput.build_model(args.model, args.model_cache_dir, max_position_embeddings=args.max_model_len)
    cost = bench_throughput.ModelCost.from_hf_config(transformers.AutoConfig.from_pretrained(model_dir))
    rng = np.random.default_rng(args.seed)
    vocab = args.model["vocab_size"]
    prompts = [rng.integers(3, vocab, size=int(n)).tolist()
               for n in rng.integers(args.prompt_lo, args.prompt_hi + 1, size=args.num_requests)]
    need = sum(len(p) for p in prompts) + args.num_requests * args.output_len
    results = []
    print(f"{len(prompts)} requests need {need} KV tokens at most, the cache holds {args.cache_tokens}")
    print(f"{'bs':>4} {'swap ms':>8} {'recomp ms':>9} {'swap/rec':>8} {'copy bw':>7} {'rec roof':>8} | "
          f"{'rec tok/s':>9} {'swap tok/s':>10} {'swap/rec':>8} {'preempt':>7} {'swaps':>5} {'blocks':>6} {'same':>4}")
    for bs in args.block_sizes:
        r = run_block_size(model_dir, args, bs, prompts, cost, roof)
        results.append(r)
        m, e = r["per_preemption"], r["end_to_end"]
        print(f"{bs:4d} {m['swap_ms']:8.2f} {m['recompute_ms']:9.2f} {m['swap_over_recompute']:8.3f} "
              f"{100 * m['swap_copy_bw_fraction']:6.1f}% {100 * m['recompute_roofline_fraction']:7.1f}% | "
              f"{e['recompute']['output_tokens_per_s']:9.1f} {e['swap']['output_tokens_per_s']:10.1f} "
              f"{r['throughput_swap_over_recompute']:8.3f} {e['recompute']['num_preemptions']:7d} "
              f"{e['swap']['num_swap_outs']:5d} {e['swap']['num_blocks_swapped_out']:6d} {str(r['tokens_identical']):>4}",
              flush=True)
    report = {"roofline": roof, "model": args.model, "num_requests": args.num_requests,
              "cache_tokens": args.cache_tokens, "output_len": args.output_len, "kv_tokens_needed": need,
              "results": results}
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
        report["_path"] = args.out
    return report


if __name__ == "__main__":
    main()
