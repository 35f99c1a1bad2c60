"""Start-up time of the engine, fused vs layered step compilation (issue 10, start-up).

    python experiments/startup_time.py                       # all runs below, one table + JSON
    python experiments/startup_time.py --runs layered-cold   # a subset

Each run is a fresh Python process (nothing compiled in memory) that times, from the start of
`LLM("smollm2-135m-instruct", ...)` with the default token buckets (8 ... 512):
  first_token_s: LLM(...) plus a first 64-token request with max_tokens=1 (compiles what it needs);
  all_warm_s:    then engine.warmup(), every bucket and step variant compiled;
  decode tok/s:  then a small steady workload (32 requests, 32-token prompts, 64 greedy tokens),
                 output tokens over its wall time (no compilation left by then: counted).
Runs: fused-cold and layered-cold (compile_cache_dir=None and JAX_ENABLE_COMPILATION_CACHE=false),
then per mode a first process filling a fresh persistent cache directory and a second one
reading it (the `-second` rows: what a user's later start costs). The machine's load (uptime) is
printed with the table: compare ratios within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
RUNS = ("layered-cold", "fused-cold", "layered-first", "layered-second", "fused-first", "fused-second")


def child(mode: str, cache_dir: str | None, decode: bool) -> dict:
    """One fresh process's timings (called with --child)."""
    t0 = time.perf_counter()
    from jaxllm import LLM, SamplingParams

    t_import = time.perf_counter() - t0
    t0 = time.perf_counter()
    llm = LLM("smollm2-135m-instruct", max_num_seqs=32, max_num_batched_tokens=512, max_model_len=1024,
              skip_tokenizer_init=True, compile_cache_dir=cache_dir, compilation=mode)
    t_init = time.perf_counter() - t0
    greedy = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    llm.generate({"prompt_token_ids": list(range(100, 164))}, greedy, use_tqdm=False)
    first_token = time.perf_counter() - t0
    llm.engine.warmup()
    all_warm = time.perf_counter() - t0
    stats = llm.get_stats()
    out = {"mode": mode, "cache": cache_dir is not None, "import_s": t_import, "init_s": t_init,
           "first_token_s": first_token, "all_warm_s": all_warm, "num_compilations": stats["num_compilations"],
           "num_compile_cache_hits": stats["num_compile_cache_hits"], "num_executables": stats["num_executables"],
           "compile_s": llm.engine.runner.compile_seconds, "buckets": list(llm.engine.resolved.token_buckets)}
    if decode:
        prompts = [{"prompt_token_ids": [(7 * i + j) % 40000 + 100 for j in range(32)]} for i in range(32)]
        params = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True)
        llm.generate(prompts[:2], params, use_tqdm=False)  # touch the decode path once
        before = llm.get_stats()["num_compilations"]
        t = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        wall = time.perf_counter() - t
        out["decode_tok_s"] = sum(len(o.outputs[0].token_ids) for o in outs) / wall
        out["steady_compilations"] = llm.get_stats()["num_compilations"] - before
    return out


def run_child(mode: str, cache_dir: str | None, decode: bool) -> dict:
    env = dict(os.environ)
    if cache_dir is None:
        env["JAX_ENABLE_COMPILATION_CACHE"] = "false"
    args = [sys.executable, os.path.abspath(__file__), "--child", mode, "--cache-dir", cache_dir or ""]
    if decode:
        args.append("--decode")
    proc = subprocess.run(args, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} run failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", nargs="+", choices=RUNS, default=list(RUNS))
    p.add_argument("--out", default=os.path.join(HERE, "results", "startup_time.json"))
    p.add_argument("--child", choices=("fused", "layered"), help=argparse.SUPPRESS)
    p.add_argument("--cache-dir", default="", help=argparse.SUPPRESS)
    p.add_argument("--decode", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.cache_dir or None, args.decode)))
        return []
    results, cache_dirs = [], {}
    for name in args.runs:
        mode, kind = name.split("-")
        if kind == "cold":
            cache = None
        else:
            cache = cache_dirs.setdefault(mode, tempfile.mkdtemp(prefix=f"jaxllm-startup-{mode}-"))
        load = os.getloadavg()[0]
        r = run_child(mode, cache, decode=kind == "cold")
        r.update(run=name, load_before=load, load_after=os.getloadavg()[0])
        results.append(r)
        print(json.dumps(r), flush=True)
    print(f"\n{'run':16s} {'first tok s':>11s} {'all warm s':>10s} {'compiles':>8s} {'hits':>5s} "
          f"{'exec':>5s} {'decode tok/s':>12s} {'load':>9s}")
    for r in results:
        tok = f"{r['decode_tok_s']:.1f}" if "decode_tok_s" in r else "-"
        print(f"{r['run']:16s} {r['first_token_s']:11.1f} {r['all_warm_s']:10.1f} {r['num_compilations']:8d} "
              f"{r['num_compile_cache_hits']:5d} {r['num_executables']:5d} {tok:>12s} "
              f"{r['load_before']:4.1f}/{r['load_after']:<4.1f}")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"uptime": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(),
                   "runs": results}, f, indent=1)
    return results


if __name__ == "__main__":
    main()
