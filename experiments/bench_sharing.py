"""Memory sharing in the paged KV cache (issue 8), measured against no sharing in the same run.

    python experiments/bench_sharing.py [--quick] [--out experiments/results/bench_sharing.json]

Model: a random-init Llama (default hidden 256, 4 layers, vocab 8000, fp32; built once by
bench_throughput.build_model). Three experiments, each on a long-tailed workload
(workloads.make_workload), each run twice in this process: with sharing (prefix caching on) and
without (prefix caching off, so nothing is shared):

  parallel   n = 2, 4, 6 samples of each prompt (SamplingParams(n)) against the same n samples
             as n independent requests with no sharing. The memory saving is the paper's: over
             the steps, 1 - blocks held / blocks the same requests reference (a shared block
             counted once per holder), also at the step referencing the most; plus output
             tokens/s. transformers' generate(num_return_sequences=n) is the peer.
  beam       beam widths 2, 4, 6 (LLM.beam_search): the same saving, and time against no
             sharing; transformers' generate(num_beams=k) is the peer.
  prefix     requests sharing a 1-shot and a 5-shot prefix (the paper's translation set-up):
             throughput with the cache on and off, and the hit rate.

Blocks are read from the engine's step observers (jaxllm/observers.py), never by patching. The
PagedAttention paper (OPT-13B) reports parallel sampling saving 6.1-9.8% (Alpaca) and 16.2-30.5%
(ShareGPT) of KV memory, beam search 37.6-55.2% and 44.3-66.3%, and 1.67x / 3.58x throughput over
Orca for 1-shot / 5-shot shared prefixes. The roofline (measured at the start) gives the fraction
of the machine's read bandwidth the weight streaming of each run reached (a lower bound: KV reads
are not counted).
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

MODEL = dict(vocab_size=8000, hidden_size=256, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=8, intermediate_size=1024, tie_word_embeddings=True)


class BlockWatcher:
    """A step observer keeping, per step, the KV blocks held (physical) and referenced (a block
    once per request holding it: what the same requests would hold without sharing)."""

    def __init__(self):
        self.used: list[int] = []
        self.referenced: list[int] = []

    def __call__(self, stats) -> None:
        self.used.append(stats.kv_blocks_used)
        self.referenced.append(stats.kv_blocks_referenced)

    def summary(self) -> dict:
        used, ref = np.asarray(self.used or [0]), np.asarray(self.referenced or [0])
        peak = int(np.argmax(ref))
        return {"peak_blocks": int(used.max()), "mean_blocks": float(used.mean()), "steps": len(self.used),
                # The paper's metric: blocks saved by sharing / blocks without sharing, over all
                # steps and at the step that referenced the most blocks.
                "saving": 1 - float(used.sum()) / max(1, float(ref.sum())),
                "saving_at_peak": 1 - used[peak] / max(1, ref[peak])}


def make_llm(model_dir: str, sharing: bool, args):
    from jaxllm import LLM

    return LLM(model_dir, block_size=args.block_size, num_kv_blocks=args.num_kv_blocks,
               max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
               max_model_len=1024, skip_tokenizer_init=True, enable_prefix_caching=sharing)


def timed(llm, fn) -> dict:
    watcher = BlockWatcher()
    llm.engine.add_step_observer(watcher)
    t0 = time.perf_counter()
    result = fn()
    elapsed = time.perf_counter() - t0
    llm.engine.remove_step_observer(watcher)
    return {"elapsed_s": elapsed, **watcher.summary()}, result


def parallel_sampling(model_dir, workload, n: int, args) -> dict:
    from jaxllm import SamplingParams

    prompts = [{"prompt_token_ids": p} for p in workload.prompts]
    out = {}
    for mode in ("shared", "independent"):
        llm = make_llm(model_dir, sharing=mode == "shared", args=args)
        llm.engine.warmup()
        if mode == "shared":
            params = [SamplingParams(n=n, temperature=0.8, seed=i, max_tokens=m, ignore_eos=True)
                      for i, m in enumerate(workload.output_lens)]
            run, outs = timed(llm, lambda: llm.generate(prompts, params, use_tqdm=False))
            tokens = sum(len(c.token_ids) for o in outs for c in o.outputs)
        else:
            params = [SamplingParams(temperature=0.8, seed=i + j, max_tokens=m, ignore_eos=True)
                      for i, m in enumerate(workload.output_lens) for j in range(n)]
            run, outs = timed(llm, lambda: llm.generate([p for p in prompts for _ in range(n)], params,
                                                        use_tqdm=False))
            tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        run.update(output_tokens=tokens, tok_per_s=tokens / run["elapsed_s"],
                   preemptions=llm.get_stats()["num_preemptions"])
        out[mode] = run
    return out


def beam(model_dir, workload, width: int, max_tokens: int, args) -> dict:
    from jaxllm import BeamSearchParams

    prompts = [{"prompt_token_ids": p} for p in workload.prompts]
    params = BeamSearchParams(beam_width=width, max_tokens=max_tokens, ignore_eos=True)
    out = {}
    for mode in ("shared", "independent"):
        llm = make_llm(model_dir, sharing=mode == "shared", args=args)
        llm.engine.warmup()
        run, outs = timed(llm, lambda: llm.beam_search(prompts, params))
        run.update(output_tokens=len(prompts) * max_tokens, tok_per_s=len(prompts) * max_tokens / run["elapsed_s"],
                   preemptions=llm.get_stats()["num_preemptions"])
        out[mode] = run
        out[f"{mode}_best"] = [o.sequences[0].tokens for o in outs]
    assert out["shared_best"] == out["independent_best"], "sharing changed the beams"
    del out["shared_best"], out["independent_best"]
    return out


def shared_prefix(model_dir, shots: int, args, num_requests: int, shot_len: int = 48) -> dict:
    from jaxllm import SamplingParams

    rng = np.random.default_rng(shots)
    prefix = rng.integers(3, MODEL["vocab_size"], size=shots * shot_len).tolist()
    prompts = [{"prompt_token_ids": prefix + rng.integers(3, MODEL["vocab_size"], size=16).tolist()}
               for _ in range(num_requests)]
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    out = {}
    for mode in ("cache_on", "cache_off"):
        llm = make_llm(model_dir, sharing=mode == "cache_on", args=args)
        llm.engine.warmup()
        run, _ = timed(llm, lambda: llm.generate(prompts, params, use_tqdm=False))
        stats = llm.get_stats()
        run.update(tok_per_s=num_requests * 16 / run["elapsed_s"], hit_rate=stats["prefix_cache_hit_rate"],
                   prompt_tokens_computed=stats["num_prompt_tokens_processed"])
        out[mode] = run
    out["speedup"] = out["cache_on"]["tok_per_s"] / out["cache_off"]["tok_per_s"]
    return out


def hf_peer(model_dir, workload, kind: str, k: int, max_tokens: int | None = None) -> dict:
    """transformers generate over the same prompts, one prompt at a time (its n / beams batched)."""
    import torch

    from tests.helpers.tiny_models import hf_model

    model = hf_model(model_dir)
    tokens, t0 = 0, time.perf_counter()
    with torch.no_grad():
        for prompt, m in zip(workload.prompts, workload.output_lens):
            m = max_tokens or m
            ids = torch.tensor([prompt])
            if kind == "parallel":
                out = model.generate(ids, do_sample=True, temperature=0.8, num_return_sequences=k,
                                     max_new_tokens=m, min_new_tokens=m, pad_token_id=0)
                tokens += k * m
            else:
                out = model.generate(ids, num_beams=k, do_sample=False, max_new_tokens=m, min_new_tokens=m,
                                     pad_token_id=0)
                tokens += m
            assert out.shape[-1] == len(prompt) + m
    elapsed = time.perf_counter() - t0
    return {"elapsed_s": elapsed, "tok_per_s": tokens / elapsed}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="4 requests, n/width 2 only, short outputs")
    parser.add_argument("--num-requests", type=int, default=None, help="default 16 (4 with --quick)")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--num-kv-blocks", type=int, default=2048)
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--max-num-batched-tokens", type=int, default=512)
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    n_req = args.num_requests or (4 if args.quick else 16)
    widths = (2,) if args.quick else (2, 4, 6)

    import bench_throughput
    from roofline import measure_roofline
    from workloads import make_workload

    roof = measure_roofline()
    print(f"roofline: {roof['matmul_flops'] / 1e9:.0f} GFLOP/s matmul, {roof['read_bandwidth'] / 1e9:.1f} GB/s read")
    model_dir = bench_throughput.build_model(MODEL, os.path.expanduser("~/.cache/jaxllm/bench_models"))
    param_bytes = 4 * (MODEL["vocab_size"] * MODEL["hidden_size"] + MODEL["num_hidden_layers"] * (
        4 * MODEL["hidden_size"] ** 2 + 3 * MODEL["hidden_size"] * MODEL["intermediate_size"]))
    # ShareGPT-shaped but short: long-tailed prompts and outputs (workloads.py).
    workload = make_workload(n_req, "lognormal:64:0.8:8:256", "fixed:8" if args.quick else "lognormal:48:0.8:8:160",
                             MODEL["vocab_size"], seed=0)

    def bw(run):
        return param_bytes * run["steps"] / run["elapsed_s"] / roof["read_bandwidth"]

    report = {"roofline": roof, "model": MODEL, "num_requests": n_req, "block_size": args.block_size,
              "parallel": {}, "beam": {}, "prefix": {}}
    for n in widths:
        r = report["parallel"][n] = parallel_sampling(model_dir, workload, n, args)
        if not args.skip_hf:
            r["hf"] = hf_peer(model_dir, workload, "parallel", n)
        print(f"parallel n={n}: KV memory saved by sharing {100 * r['shared']['saving']:.1f}% "
              f"(at the peak step {100 * r['shared']['saving_at_peak']:.1f}%; unshared run "
              f"{100 * r['independent']['saving']:.1f}%), peak blocks {r['shared']['peak_blocks']} vs "
              f"{r['independent']['peak_blocks']}, tok/s {r['shared']['tok_per_s']:.0f} vs {r['independent']['tok_per_s']:.0f}"
              + (f", transformers {r['hf']['tok_per_s']:.0f} ({r['shared']['tok_per_s'] / r['hf']['tok_per_s']:.1f}x)"
                 if "hf" in r else "") + f", weight-read bw {100 * bw(r['shared']):.1f}% of roofline")
    beam_tokens = 8 if args.quick else 24
    for width in widths:
        r = report["beam"][width] = beam(model_dir, workload, width, beam_tokens, args)
        if not args.skip_hf:
            r["hf"] = hf_peer(model_dir, workload, "beam", width, beam_tokens)
        print(f"beam width={width}: KV memory saved by sharing {100 * r['shared']['saving']:.1f}% "
              f"(at the peak step {100 * r['shared']['saving_at_peak']:.1f}%; unshared run "
              f"{100 * r['independent']['saving']:.1f}%), time {r['shared']['elapsed_s']:.1f}s vs {r['independent']['elapsed_s']:.1f}s"
              + (f", transformers {r['hf']['elapsed_s']:.1f}s" if "hf" in r else "")
              + f", weight-read bw {100 * bw(r['shared']):.1f}% of roofline")
    for shots in (1, 5):
        r = report["prefix"][shots] = shared_prefix(model_dir, shots, args, num_requests=max(8, 2 * n_req))
        print(f"{shots}-shot prefix: {r['cache_on']['tok_per_s']:.0f} vs {r['cache_off']['tok_per_s']:.0f} tok/s "
              f"({r['speedup']:.2f}x), hit rate {100 * r['cache_on']['hit_rate']:.1f}%, "
              f"weight-read bw {100 * bw(r['cache_on']):.1f}% of roofline")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1, default=str)
    return report


if __name__ == "__main__":
    main()
