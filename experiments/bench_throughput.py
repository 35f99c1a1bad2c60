"""Offline throughput: jaxllm vs transformers (static `generate` and continuous batching), same run.
A thin script over jaxllm.bench (the same run is `jaxllm bench throughput --config
experiments/configs/throughput.toml`); it keeps this script's flags and JSON keys.

    python experiments/bench_throughput.py                      # ~138M Llama, long-tailed workload
    python experiments/bench_throughput.py --quick              # tiny model smoke run
    python experiments/bench_throughput.py --prompt-dist fixed:128 --output-dist uniform:16:256

What it does (see experiments/README.md for every number): measures the machine's roofline;
builds (once) a random-init Llama; samples N requests (token-id prompts, exact output lengths,
ignore_eos, greedy); runs jaxllm (warm-up timed apart, then all requests at t=0 through the
harness's timed driver, per-step records from the engine's step observers), transformers
static `generate` and transformers continuous batching (a failure is recorded, the run goes
on), and vLLM when its venv exists (--vllm). The harness's run directory (config.json,
requests.csv, steps.csv, summary.json) is written beside the JSON.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxllm.bench import BenchConfig, EngineArgs, WorkloadConfig, run_benchmark  # noqa: E402
from jaxllm.bench.models import SHAPES, build_model  # noqa: E402,F401 (build_model: other experiments)
from jaxllm.bench.results import write_json  # noqa: E402
from jaxllm.bench.roofline import ModelCost  # noqa: E402,F401 (other experiments import it from here)
from jaxllm.bench.workloads import SHAREGPT_OUTPUT, SHAREGPT_PROMPT  # noqa: E402

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
DEFAULT_MODEL, TINY_MODEL = SHAPES["138m"], SHAPES["tiny"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny model, 8 requests: a smoke test")
    p.add_argument("--num-requests", "-n", type=int, default=None, help="default 64 (8 with --quick)")
    p.add_argument("--prompt-dist", default=None, help=f"default {SHAREGPT_PROMPT}")
    p.add_argument("--output-dist", default=None, help=f"default {SHAREGPT_OUTPUT}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default=None, help="a model dir / alias instead of the random Llama")
    p.add_argument("--model-cache-dir", default=os.path.expanduser("~/.cache/jaxllm/bench_models"))
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--max-num-seqs", type=int, default=None, help="default 32 (4 with --quick); also HF batch size")
    p.add_argument("--max-num-batched-tokens", type=int, default=None, help="default 512 (64 with --quick)")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--kv-cache-gib", type=float, default=None, help="KV budget; default 1.0 (0.01 with --quick)")
    p.add_argument("--num-kv-blocks", type=int, default=None, help="overrides --kv-cache-gib")
    p.add_argument("--token-buckets", default=None, help="comma-separated, e.g. 32,128,512")
    p.add_argument("--skip-hf-static", action="store_true")
    p.add_argument("--skip-hf-cb", action="store_true")
    p.add_argument("--vllm", action="store_true", help="also run vLLM (skipped, saying so, without its venv)")
    p.add_argument("--hf-cb-timeout", type=float, default=1800.0)
    p.add_argument("--torch-threads", type=int, default=None, help="torch.set_num_threads for the transformers runs")
    p.add_argument("--out", default=None, help="results JSON path (default experiments/results/<auto>.json)")
    p.add_argument("--runs-dir", default=os.path.join(RESULTS_DIR, "runs"), help="the harness's run directories")
    args = p.parse_args(argv)
    q = args.quick

    def default(name, normal, quick):
        if getattr(args, name) is None:
            setattr(args, name, quick if q else normal)

    default("num_requests", 64, 8)
    default("prompt_dist", SHAREGPT_PROMPT, "uniform:4:24")
    default("output_dist", SHAREGPT_OUTPUT, "lognormal:8:0.8:2:32")
    default("max_num_seqs", 32, 4)
    default("max_num_batched_tokens", 512, 64)
    default("kv_cache_gib", 1.0, 0.01)
    default("model", "random:138m", "random:tiny")
    if q and args.token_buckets is None:
        args.token_buckets = "16,64"  # two buckets: fewer compiles keep the smoke run short
    return args


def config(args) -> BenchConfig:
    systems = ["jaxllm"] + (["hf_static"] if not args.skip_hf_static else []) + (
        ["hf_continuous"] if not args.skip_hf_cb else []) + (["vllm"] if args.vllm else [])
    engine = EngineArgs(dtype=args.dtype, block_size=args.block_size, num_kv_blocks=args.num_kv_blocks,
                        kv_cache_memory_bytes=None if args.num_kv_blocks else int(args.kv_cache_gib * (1 << 30)),
                        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                        token_buckets=tuple(int(x) for x in args.token_buckets.split(",")) if args.token_buckets else None)
    workload = WorkloadConfig(num_prompts=args.num_requests, input_len=args.prompt_dist,
                              output_len=args.output_dist, seed=args.seed)
    return BenchConfig(model=args.model, systems=tuple(systems), engine=engine, workload=workload,
                       roofline_size="quick" if args.quick else "full", output_dir=args.runs_dir,
                       model_cache_dir=args.model_cache_dir, hf_cb_timeout=args.hf_cb_timeout,
                       torch_threads=args.torch_threads)


def _throughput(s: dict) -> dict:
    return {"elapsed_s": s["duration_s"], "requests_per_s": s["request_throughput"],
            "output_tokens_per_s": s["output_throughput"], "total_tokens_per_s": s["total_token_throughput"],
            "output_tokens": s["total_output_tokens"]}


def jaxllm_view(s: dict, steps, block_size: int) -> dict:
    """The jaxllm section in this script's keys, from the harness's summary and step table."""
    info = s["info"]
    out = _throughput(s)
    out.update(load_time_s=info["load_time_s"], compile_time_s=info["warmup_s"],
               new_compilations_during_run=info["new_compilations_during_run"],
               engine_stats=info["engine_stats"], config=info["engine_kwargs"])
    used = steps["kv_blocks_used"].to_numpy(np.float64)
    usable = steps["num_kv_blocks"].to_numpy(np.float64)
    # Tokens whose K/V the step's requests hold (computed + new) against the slots of their blocks.
    stored = steps["num_context_tokens"].to_numpy(np.float64)
    slots = steps["kv_blocks_referenced"].to_numpy(np.float64) * block_size
    out["kv_cache"] = {"block_usage_mean": float(np.mean(used / usable)), "block_usage_max": float(np.max(used / usable)),
                       "slot_fill_mean": float(np.mean(np.where(slots > 0, stored / np.maximum(slots, 1), 1.0))),
                       "slot_fill_weighted": float(stored.sum() / max(slots.sum(), 1)),
                       "token_usage_mean": float(np.mean(stored / (usable * block_size))),
                       "usable_blocks": int(usable[0]), "block_size": block_size}
    n = len(steps)
    step_s = (steps["end_time"] - steps["start_time"]).to_numpy()
    tot = {"device": s["device_time_s"], "host": s["host_time_s"],
           "outside_steps": s["duration_s"] - float(step_s.sum())}
    out["steps"] = {"num_steps": n, "time_s": tot, "time_frac": {k: v / s["duration_s"] for k, v in tot.items()},
                    "mean_step_ms": 1e3 * float(step_s.mean()), "mean_execute_ms": 1e3 * s["device_time_s"] / n,
                    "mean_host_ms": 1e3 * s["host_time_s"] / n, "mean_seqs_per_step": s["mean_batch_requests"],
                    "mean_tokens_per_step": s["mean_batch_tokens"], "token_padding_frac": s["token_padding_frac"]}
    out["roofline"] = s.get("roofline", {})
    out["latency_ms"] = {k: s[k] for k in s if k.endswith("_ms") and k.split("_")[1] in ("ttft", "tpot", "itl", "e2el")}
    return out


def main(argv=None) -> dict:
    args = parse_args(argv)
    cfg = config(args)
    t0 = time.perf_counter()
    run = run_benchmark(cfg)
    s = run.summary
    systems = s["systems"]
    if "output_throughput" not in systems["jaxllm"]:
        raise RuntimeError(f"jaxllm failed: {systems['jaxllm']}")
    results = {"timestamp": time.strftime("%Y-%m-%dT%H:%M:%S"),
               "command": " ".join([os.path.basename(sys.argv[0])] + (sys.argv[1:] if argv is None else list(argv))),
               "run_dir": run.path, "workload": s["workload"], "roofline": s["roofline"],
               "jaxllm": jaxllm_view(systems["jaxllm"], run.steps[run.steps["system"] == "jaxllm"], args.block_size)}
    for name in ("hf_static", "hf_continuous", "vllm"):
        x = systems.get(name)
        if x is None:
            continue
        if "output_throughput" not in x:
            results[name] = {k: v for k, v in x.items() if k in ("error", "skipped", "traceback")}
            continue
        results[name] = {**_throughput(x), **x["info"]}
    results["ratios"] = {k: v["output_throughput"] for k, v in s["ratios"].items()}
    results["total_bench_time_s"] = time.perf_counter() - t0
    out = args.out or os.path.join(RESULTS_DIR, f"throughput_{'quick' if args.quick else args.model.replace(':', '_')}"
                                                f"_n{args.num_requests}_{args.output_dist.split(':')[0]}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    write_json(out, results)
    print(f"wrote {out}")
    results["_path"] = out
    return results


if __name__ == "__main__":
    main()
