"""One command to check jaxllm on a TPU or GPU: kernels, engine, bandwidth, throughput.

    python experiments/accelerator_check.py                 # on a TPU/GPU host, < 8 minutes
    python experiments/accelerator_check.py --quick         # CPU smoke run (tests/test_accelerator_check.py)

Parts (each a row of the final table, and an entry of the JSON):
  kernel:*     the platform's Pallas ragged paged attention, COMPILED (TPU: Mosaic TPU, f32 and
               bf16; GPU: the Mosaic GPU WGMMA kernel, bf16), against the float64 dense reference
               on decode, prefill, mixed and sliding-window cases. On CPU: the TPU kernel in
               interpret mode (f32, bf16) instead, and the compiled parts are listed as skipped.
  engine       LLM(attention_backend="pallas") against "reference" on a tiny random Llama
               (head_dim 64, so the GPU kernel is the one used; bf16 on an accelerator, f32 on
               CPU where the kernel is interpreted): greedy tokens compared request by request.
  bandwidth:*  the decode kernel's unique K/V bytes read per second, and that as a fraction of
               the chip's HBM peak (experiments/bench_attention.PEAK_BW). Skipped on CPU:
               interpret-mode timings measure the interpreter.
  throughput   experiments/bench_vs_vllm.py's jaxllm worker on a ~1B-parameter random Llama
               (bf16), 64 long-tailed requests: output tok/s, start-up, compilations after
               warm-up (must be 0). Skipped on CPU (too large for a CPU smoke run).

Every failure is caught and reported in its row, so one broken part never hides the others; the
exit status is 1 if any part that ran failed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import bench_attention  # noqa: E402  (case builder, peak bandwidths)
from jaxllm.attention import reference  # noqa: E402

# Max |kernel - float64 reference| allowed, by dtype (bf16: inputs rounded to 8 mantissa bits).
TOLERANCE = {"float32": 2e-4, "bfloat16": 3e-2}
# (name, T, [(q_len, kv_len)], sliding_window)
KERNEL_CASES = [
    ("decode", 8, [(1, 1), (1, 17), (1, 100), (1, 256)], None),
    ("prefill", 64, [(40, 40), (24, 24)], None),
    ("mixed", 64, [(30, 100), (1, 33), (1, 16), (1, 64)], None),
    ("sliding", 64, [(48, 130), (1, 90)], 32),
]
# CPU smoke run: the interpreter is slow, so one small mixed batch (a chunk and two decodes).
QUICK_KERNEL_CASES = [("mixed", 16, [(9, 20), (1, 33), (1, 1)], None)]
BANDWIDTH_BUCKETS = ("decode-8x1k", "decode-32x2k", "decode-64x512")
# ~1.1B parameters: Llama shape with GQA.
MODEL_1B = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=False)


def platform() -> str:
    p = jax.default_backend()
    return "cuda" if p == "gpu" else p


def kernel_fn(plat: str, dtype: str):
    """(name, fn) of the kernel this check runs for (platform, dtype), or None when none applies."""
    from pallas_kernels.ragged_paged_attention import gpu, tpu

    if plat == "tpu":
        return "mosaic-tpu", tpu.ragged_paged_attention
    if plat == "cuda":
        return ("mosaic-gpu-wgmma", gpu.ragged_paged_attention) if dtype == "bfloat16" else None
    return "tpu-interpret", lambda *a, **kw: tpu.ragged_paged_attention(*a, interpret=True, **kw)


def check_kernel(plat: str, dtype: str, cases, quick: bool = False) -> dict:
    named = kernel_fn(plat, dtype)
    if named is None:
        return {"skipped": f"no {dtype} kernel on {plat} (WGMMA has no f32: the engine uses the reference)"}
    name, fn = named
    nKV, group, D, bs = (1, 2, 64, 8) if quick else (2, 4, 128, 16)
    worst, rows = 0.0, []
    for case, T, seqs, window in cases:
        q, k, v, kv_lens, bt, cu = bench_attention.build(seqs, T, nKV=nKV, D=D, group=group, block_size=bs,
                                                         dtype=jnp.dtype(dtype))
        kw = dict(sm_scale=D ** -0.5, sliding_window=window)
        out = np.asarray(jax.jit(lambda *a: fn(*a, **kw))(q, k, v, kv_lens, bt, cu), np.float64)
        ref = reference.dense_reference(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32),
                                        kv_lens, bt, cu, **kw)
        n = int(np.asarray(cu)[-1])
        err = float(np.max(np.abs(out[:n] - ref[:n])))
        worst = max(worst, err)
        rows.append({"case": case, "max_abs_err": err})
    ok = worst <= TOLERANCE[dtype]
    return {"kernel": name, "compiled": plat != "cpu", "max_abs_err": worst, "tolerance": TOLERANCE[dtype],
            "cases": rows, "ok": ok}


def check_engine(plat: str, cache_dir: str, quick: bool = False) -> dict:
    import transformers
    import torch

    from jaxllm import LLM, SamplingParams

    path = os.path.join(cache_dir, "accel-check-tiny-llama-d64")
    if not os.path.exists(os.path.join(path, "model.safetensors")):
        torch.manual_seed(0)
        cfg = transformers.LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                       num_attention_heads=2, num_key_value_heads=1, vocab_size=512,
                                       max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0)
        tmp = path + f".tmp{os.getpid()}"
        transformers.LlamaForCausalLM(cfg).save_pretrained(tmp, safe_serialization=True)
        os.replace(tmp, path)
    dtype = "float32" if plat == "cpu" else "bfloat16"
    rng = np.random.default_rng(0)
    # Quick: one token bucket; else a 40-token prompt is chunked while the others decode.
    lens, budget, buckets = ((3, 6), 16, (16,)) if quick else ((3, 9, 40), 32, None)
    prompts = [{"prompt_token_ids": rng.integers(3, 512, n).tolist()} for n in lens]
    params = SamplingParams(temperature=0.0, max_tokens=3 if quick else 6, ignore_eos=True)
    tokens = {}
    for backend in ("reference", "pallas"):
        llm = LLM(path, dtype=dtype, attention_backend=backend, block_size=16, num_kv_blocks=32, max_num_seqs=4,
                  max_num_batched_tokens=budget, token_buckets=buckets, skip_tokenizer_init=True)
        tokens[backend] = [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params, use_tqdm=False)]
    same = sum(a == b for a, b in zip(tokens["reference"], tokens["pallas"]))
    # bf16 greedy may flip at near-ties; f32 must agree exactly.
    ok = same == len(prompts) or (dtype == "bfloat16" and same >= len(prompts) - 1)
    return {"dtype": dtype, "requests_identical": same, "num_requests": len(prompts), "ok": ok, "tokens": tokens}


def check_bandwidth(plat: str, bucket: str) -> dict:
    from jaxllm.attention import pallas as adapter

    name, T, seqs = next(b for b in bench_attention.BUCKETS if b[0] == bucket)
    nKV, D, group, dtype = 8, 128, 4, jnp.bfloat16
    inputs = bench_attention.build(seqs, T, nKV=nKV, D=D, group=group, block_size=16, dtype=dtype)
    fn = jax.jit(lambda *a: adapter.ragged_paged_attention(*a, sm_scale=D ** -0.5))
    fn(*inputs).block_until_ready()
    best = float("inf")
    for _ in range(10):
        t0 = time.perf_counter()
        fn(*inputs).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    kv_bytes = sum(2 * kv * nKV * D * 2 for _, kv in seqs)
    kind = jax.devices()[0].device_kind
    peak = next((bw for k, bw in bench_attention.PEAK_BW.items() if kind.startswith(k)), None)
    bw = kv_bytes / best
    return {"device_kind": kind, "time_ms": best * 1e3, "kv_gb_per_s": bw / 1e9,
            "frac_of_hbm_peak": bw / peak if peak else None, "ok": True}


def check_throughput(cache_dir: str, num_requests: int) -> dict:
    import bench_vs_vllm
    from workloads import SHAREGPT_OUTPUT, SHAREGPT_PROMPT, make_workload

    path = os.path.join(cache_dir, "accel-check-llama-1b")
    if not os.path.exists(os.path.join(path, "model.safetensors")):
        import torch
        import transformers

        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            **MODEL_1B, bos_token_id=1, eos_token_id=2, pad_token_id=0)).to(torch.bfloat16)
        tmp = path + f".tmp{os.getpid()}"
        model.save_pretrained(tmp, safe_serialization=True)
        os.replace(tmp, path)
    w = make_workload(num_requests, SHAREGPT_PROMPT, SHAREGPT_OUTPUT, vocab_size=MODEL_1B["vocab_size"], seed=0)
    spec = {"model": path, "prompts": w.prompts, "output_lens": w.output_lens, "max_num_seqs": 64,
            "max_num_batched_tokens": 512, "max_model_len": max(len(p) + o for p, o in zip(w.prompts, w.output_lens)),
            "llm_kwargs": {"dtype": "bfloat16", "attention_backend": "pallas"}}
    r = bench_vs_vllm._run_worker("jaxllm", spec, pythonpath=ROOT)
    if "error" in r:
        return {"ok": False, "error": r["error"]}
    keep = ("output_tokens_per_s", "elapsed_s", "time_to_first_token_s", "all_buckets_ready_s",
            "new_compilations_during_run", "kv_cache_bytes", "peak_rss_bytes")
    return dict({k: r[k] for k in keep}, num_params=sum_params(MODEL_1B), ok=r["new_compilations_during_run"] == 0)


def sum_params(c: dict) -> int:
    h, i, n, v = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
    d = h // c["num_attention_heads"]
    return n * (2 * h * h + 2 * h * c["num_key_value_heads"] * d + 3 * h * i) + 2 * v * h


_WANTED: set[str] = set()  # --parts of the current run


def run_part(name: str, fn, *args) -> dict:
    if name.split(":")[0] not in _WANTED:
        return {"skipped": "not requested (--parts)"}
    t0 = time.perf_counter()
    try:
        r = fn(*args)
    except Exception as e:  # noqa: BLE001 - report and go on with the other parts
        r = {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-2000:]}
    r["seconds"] = time.perf_counter() - t0
    status = "skipped" if "skipped" in r else ("ok" if r.get("ok") else "FAILED")
    print(f"  {name:<28} {status:<8} {r['seconds']:6.1f} s", flush=True)
    return r


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer kernel cases (CPU smoke test)")
    ap.add_argument("--parts", default="kernel,engine,bandwidth,throughput",
                    help="comma-separated parts to run (the others are reported as not requested)")
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--cache-dir", default=os.path.expanduser("~/.cache/jaxllm/bench_models"))
    ap.add_argument("--out", default=os.path.join(HERE, "results", "accelerator_check.json"))
    args = ap.parse_args(argv)
    _WANTED.clear()
    _WANTED.update(args.parts.split(","))
    os.makedirs(args.cache_dir, exist_ok=True)
    plat = platform()
    on_cpu = plat == "cpu"
    print(f"accelerator check on {plat} ({jax.devices()[0].device_kind}, {jax.device_count()} devices)")
    parts: dict[str, dict] = {}
    cases = QUICK_KERNEL_CASES if args.quick else KERNEL_CASES
    for dtype in ("float32", "bfloat16"):
        if args.quick and on_cpu and dtype == "bfloat16":
            parts[f"kernel:{dtype}"] = {"skipped": "--quick on CPU interprets the f32 kernel only"}
            continue
        parts[f"kernel:{dtype}"] = run_part(f"kernel:{dtype}", check_kernel, plat, dtype, cases, args.quick)
    if on_cpu:
        parts["kernel:compiled"] = {"skipped": "compiled Mosaic TPU / Mosaic GPU (WGMMA) kernels need a TPU or "
                                               "GPU; the kernel rows above ran the TPU kernel in interpret mode"}
    parts["engine"] = run_part("engine", check_engine, plat, args.cache_dir, args.quick)
    for bucket in BANDWIDTH_BUCKETS:
        if on_cpu:
            parts[f"bandwidth:{bucket}"] = {"skipped": "interpret-mode timings measure the interpreter, not HBM"}
        else:
            parts[f"bandwidth:{bucket}"] = run_part(f"bandwidth:{bucket}", check_bandwidth, plat, bucket)
    if on_cpu:
        parts["throughput"] = {"skipped": "a ~1B-parameter model is too large for the CPU smoke run"}
    else:
        parts["throughput"] = run_part("throughput", check_throughput, args.cache_dir, args.num_requests)

    print(f"\n{'part':<28}{'status':<9}detail")
    for name, r in parts.items():
        if "skipped" in r:
            status, detail = "skipped", r["skipped"]
        else:
            status = "ok" if r.get("ok") else "FAILED"
            detail = r.get("error") or ", ".join(
                f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()
                if k in ("kernel", "max_abs_err", "requests_identical", "kv_gb_per_s", "frac_of_hbm_peak",
                         "output_tokens_per_s", "all_buckets_ready_s", "new_compilations_during_run") and v is not None)
        print(f"{name:<28}{status:<9}{detail[:150]}")
    result = {"platform": plat, "device_kind": jax.devices()[0].device_kind, "parts": parts,
              "ok": all(r.get("ok") for r in parts.values() if "skipped" not in r)}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1, default=str)
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    sys.exit(0 if main()["ok"] else 1)
