"""Recompute vs swap preemption across block sizes (the PagedAttention paper's Fig. 19): a thin
script over jaxllm.bench's sweep of experiments/configs/preemption.toml.

    python experiments/bench_preemption.py [--block-sizes 8,16,32,64,128,256] [--out results/x.json]
    python experiments/bench_preemption.py --quick        # tiny model, two block sizes (smoke test)

The KV cache holds the same number of tokens at every block size and the workload needs several
times that, so requests are preempted again and again. One harness run per (block size, mode):

  end to end (the whole workload through the timed driver): output_tokens_per_s per mode, the
    swap / recompute throughput ratio, preemptions, swaps, blocks copied, fallbacks, and whether
    both modes gave the same greedy tokens (the runs' output digests).
  per preemption (the config's preemption_cost_tokens, jaxllm/bench/preemption.py, measured on
    each run's engine after its run): recompute_ms, the step computing a victim's tokens again
    (from the recompute run), and swap_ms, its blocks copied out and back (from the swap run);
    swap_over_recompute (< 1: swapping this victim is cheaper); swap_copy_bw_fraction (bytes
    copied / swap time / the roofline's copy bandwidth) and recompute_roofline_fraction (the
    prefill step's roofline time / its measured time).

On a CPU "device" and pinned_host are the same DRAM, so a swap is a memcpy; on an accelerator it
crosses PCIe and the ratio moves towards recompute. The JSON keeps the keys of this script's
earlier version (results -> block_size, per_preemption, end_to_end, ...).
"""

from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from jaxllm.bench import load_run, load_toml, sweep  # noqa: E402
from jaxllm.bench.models import SHAPES  # noqa: E402
from jaxllm.bench.results import read_summary, write_json  # noqa: E402
from jaxllm.bench.run import run_benchmark  # noqa: E402

CONFIG = os.path.join(ROOT, "experiments", "configs", "preemption.toml")
# --quick: the tiny model (512 B of KV per token): ~256 cached tokens plus a 64-token sink block.
QUICK = dict(model="random:tiny", num_prompts=8, input_len="uniform:16:64", output_len="fixed:24",
             max_num_batched_tokens=128, max_model_len=256, token_buckets=[16, 64, 128],
             kv_cache_memory_bytes=(256 + 64) * 512, preemption_cost_tokens=128, preemption_cost_reps=3,
             roofline_size="quick")
STAT_KEYS = ("num_preemptions", "num_swap_outs", "num_swap_ins", "num_blocks_swapped_out",
             "num_blocks_swapped_in", "num_swap_fallbacks", "num_steps")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny model, block sizes 16 and 64, 8 requests")
    p.add_argument("--block-sizes", default=None, help="comma-separated (default: the config's)")
    p.add_argument("-n", "--num-requests", type=int, default=None)
    p.add_argument("--output-len", type=int, default=None)
    p.add_argument("--reps", type=int, default=None, help="repetitions of each per-preemption timing")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model-cache-dir", default=os.path.expanduser("~/.cache/jaxllm/bench_models"))
    p.add_argument("--runs-dir", default=None, help="the harness's run directories (default: the config's)")
    p.add_argument("--out", default=None)
    return p.parse_args(argv)


def _end_to_end(summary: dict) -> dict:
    s = summary["systems"]["jaxllm"]
    stats = s["info"]["engine_stats"]
    return {"elapsed_s": s["duration_s"], "output_tokens_per_s": s["output_throughput"],
            "new_compilations": s["info"]["new_compilations_during_run"], **{k: stats[k] for k in STAT_KEYS}}


def main(argv=None) -> dict:
    args = parse_args(argv)
    base, axes = load_toml(CONFIG)
    over = dict(QUICK) if args.quick else {}
    for flag, field in (("num_requests", "num_prompts"), ("reps", "preemption_cost_reps")):
        if getattr(args, flag) is not None:
            over[field] = getattr(args, flag)
    if args.output_len is not None:
        over["output_len"] = f"fixed:{args.output_len}"
    over.update(seed=args.seed, model_cache_dir=args.model_cache_dir, **({"output_dir": args.runs_dir} if args.runs_dir else {}))
    base = base.replace(**over)
    sizes = ([int(b) for b in args.block_sizes.split(",")] if args.block_sizes
             else [16, 64] if args.quick else axes["block_size"])
    table = sweep(base, {"block_size": sizes, "preemption_mode": ["recompute", "swap"]}, log=lambda *a: None,
                  run_fn=lambda cfg, roofline=None, log=print: run_benchmark(cfg, roofline=roofline, log=log))
    shape = SHAPES[base.model.split(":", 1)[1]] if base.model.startswith("random:") else None
    results, roof, need, cache_tokens = [], None, None, None
    print(f"{'bs':>4} {'swap ms':>8} {'recomp ms':>9} {'swap/rec':>8} {'copy bw':>7} {'rec roof':>8} | "
          f"{'rec tok/s':>9} {'swap tok/s':>10} {'swap/rec':>8} {'preempt':>7} {'swaps':>5} {'blocks':>6} {'same':>4}")
    for bs in sizes:
        runs = {}
        for mode in ("recompute", "swap"):
            row = table[(table["block_size"] == bs) & (table["preemption_mode"] == mode)].iloc[0]
            if row["status"] != "ok":
                raise RuntimeError(f"block_size={bs} {mode}: {row['error']}")
            runs[mode] = (read_summary(row["run_dir"]), load_run(row["run_dir"]).requests)
        (rec, rec_req), (swp, swp_req) = runs["recompute"], runs["swap"]
        roof = rec["roofline"]
        r, s = rec["systems"]["jaxllm"], swp["systems"]["jaxllm"]
        need = int(rec_req["prompt_len"].sum() + rec_req["output_len"].sum())
        cache_tokens = r["info"]["num_kv_blocks"] * bs
        micro = {"victim_tokens": r["preemption_victim_tokens"], "victim_blocks": -(-r["preemption_victim_tokens"] // bs),
                 "swap_ms": s["preemption_swap_ms"], "recompute_ms": r["preemption_recompute_ms"],
                 "swap_over_recompute": s["preemption_swap_ms"] / r["preemption_recompute_ms"],
                 "swap_copy_bw_fraction": s.get("preemption_swap_copy_bw_fraction"),
                 "recompute_roofline_fraction": r.get("preemption_recompute_roofline_fraction")}
        e2e = {"recompute": _end_to_end(rec), "swap": _end_to_end(swp)}
        same = (rec_req.sort_values("request_id")["output_digest"].tolist()
                == swp_req.sort_values("request_id")["output_digest"].tolist())
        res = {"block_size": bs, "num_kv_blocks": r["info"]["num_kv_blocks"], "num_cpu_blocks": s["info"]["num_cpu_blocks"],
               "compile_s": r["info"]["warmup_s"] + s["info"]["warmup_s"], "per_preemption": micro, "end_to_end": e2e,
               "throughput_swap_over_recompute": s["output_throughput"] / r["output_throughput"],
               "tokens_identical": same, "run_dirs": {m: table[(table["block_size"] == bs) & (table["preemption_mode"] == m)]
                                                      ["run_dir"].iloc[0] for m in runs}}
        results.append(res)
        m, e = micro, e2e
        print(f"{bs:4d} {m['swap_ms']:8.2f} {m['recompute_ms']:9.2f} {m['swap_over_recompute']:8.3f} "
              f"{100 * (m['swap_copy_bw_fraction'] or 0):6.1f}% {100 * (m['recompute_roofline_fraction'] or 0):7.1f}% | "
              f"{e['recompute']['output_tokens_per_s']:9.1f} {e['swap']['output_tokens_per_s']:10.1f} "
              f"{res['throughput_swap_over_recompute']:8.3f} {e['recompute']['num_preemptions']:7d} "
              f"{e['swap']['num_swap_outs']:5d} {e['swap']['num_blocks_swapped_out']:6d} {str(same):>4}", flush=True)
    report = {"roofline": roof, "model": shape or base.model, "num_requests": base.workload.num_prompts,
              "cache_tokens": cache_tokens, "output_len": base.workload.output_len, "kv_tokens_needed": need,
              "results": results}
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        write_json(args.out, report)
        report["_path"] = args.out
    return report


if __name__ == "__main__":
    main()
