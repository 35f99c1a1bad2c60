"""CPU microbenchmark of the jnp reference ragged paged attention, against an older version of it.

    python experiments/bench_reference_attention.py [--baseline-rev b4e75ab|none] [--reps 7]
                                                    [--cases decode,prefill,...] [--out results.json]

Shapes are one layer of the 138M Llama the throughput benchmark uses (nKV=12 = nH, D=64, fp32,
block_size 16) in the batch compositions the engine produces on CPU:

  decode        32 decode tokens, kv lengths lognormal (mean ~150, max 500), T=32
  prefill       512 tokens from 7 prompts of ~73 tokens, T=512
  mixed         one 256-token prefill chunk (at 256..512) + 31 decodes (lognormal), T=512 bucket
  decode-long   32 decodes of 1000-2000 tokens (long contexts must not regress)
  prefill-long  one 512-token chunk at 1536..2048

For each case it reports the median ms per call over --reps timed calls (after a warm-up), and the
"needed" K/V bandwidth: sum over sequences of 2 * kv_len * nKV * D * 4 bytes / time, i.e. the rate
at which a perfect kernel would have to read the cache. The baseline (the reference as of
--baseline-rev, loaded with `git show` into a temporary module) and the current code are timed in
the same process, interleaved, so their ratio is meaningful on a shared machine even when absolute
numbers move.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "experiments"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import bench_attention  # noqa: E402  (its case builder)
from jaxllm.attention import reference  # noqa: E402

# The reference before the CPU rewrite (tiles of consecutive tokens, per-token gather up to the
# longest sequence of a tile, 512-token chunks for single-sequence tiles).
DEFAULT_BASELINE_REV = "edc2e7f"


def load_baseline(rev):
    src = subprocess.run(["git", "-C", ROOT, "show", f"{rev}:jaxllm/attention/reference.py"],
                         check=True, capture_output=True, text=True).stdout
    path = os.path.join(tempfile.mkdtemp(), f"reference_{rev}.py")
    with open(path, "w") as f:
        f.write(src)
    spec = importlib.util.spec_from_file_location(f"_baseline_reference_{rev}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def lognormal_lengths(n, rng, median=110, sigma=0.8, lo=8, hi=500):
    x = np.round(np.exp(rng.normal(np.log(median), sigma, n))).astype(int)
    x = np.clip(x, lo, hi)
    x[rng.integers(n)] = hi  # the tail is what the old tiling paid for: make sure it is there
    return x


def cases(rng):
    dec = lognormal_lengths(32, rng)
    dec31 = lognormal_lengths(31, rng)
    return {
        "decode": (32, [(1, int(k)) for k in dec]),
        "prefill": (512, [(73, 73)] * 7),
        "mixed": (512, [(256, 512)] + [(1, int(k)) for k in dec31]),
        "decode-long": (32, [(1, int(k)) for k in rng.integers(1000, 2001, 32)]),
        "prefill-long": (512, [(512, 2048)]),
    }


def build(seqs, T, *, nKV=12, D=64, group=1, block_size=16, seed=0):
    """bench_attention's paged inputs in f32, plus the K/V bytes a perfect kernel reads."""
    inputs = bench_attention.build(seqs, T, nKV=nKV, D=D, group=group, block_size=block_size,
                                   dtype=jnp.float32, seed=seed)
    kv_bytes = int(sum(2 * kv * nKV * D * 4 for _, kv in seqs))
    return inputs, kv_bytes


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline-rev", default=DEFAULT_BASELINE_REV, help="git rev, or 'none'")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--cases", default="", help="comma-separated case names (default: all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="")
    args = ap.parse_args()

    impls = {"current": reference.ragged_paged_attention}
    if args.baseline_rev != "none":
        impls = {"baseline": load_baseline(args.baseline_rev).ragged_paged_attention, **impls}
    D = 64
    sm_scale = D ** -0.5
    wanted = set(args.cases.split(",")) if args.cases else None
    rows = []
    print(f"load average at start: {os.getloadavg()[0]:.2f}")
    for name, (T, seqs) in cases(np.random.default_rng(args.seed)).items():
        if wanted and name not in wanted:
            continue
        inputs, kv_bytes = build(seqs, T, D=D)
        fns = {k: jax.jit(lambda *a, f=f: f(*a, sm_scale=sm_scale)) for k, f in impls.items()}
        outs = {k: np.asarray(fn(*inputs)) for k, fn in fns.items()}  # compile + warm up
        if "baseline" in outs:
            err = float(np.max(np.abs(outs["baseline"] - outs["current"])))
            assert err < 1e-4, f"{name}: current differs from baseline by {err}"
        times = {k: [] for k in fns}
        for _ in range(args.reps):  # interleaved so load changes hit both alike
            for k, fn in fns.items():
                t0 = time.perf_counter()
                fn(*inputs).block_until_ready()
                times[k].append(time.perf_counter() - t0)
        kv_lens = [kv for _, kv in seqs]
        row = dict(case=name, T=T, num_seqs=len(seqs), kv_len_sum=int(sum(kv_lens)),
                   kv_len_max=int(max(kv_lens)), kv_bytes=kv_bytes)
        line = f"{name:13s} T={T:4d} S={len(seqs):2d} kv sum {sum(kv_lens):6d} max {max(kv_lens):5d} |"
        for k, ts in times.items():
            ms = float(np.median(ts)) * 1e3
            row[f"{k}_ms"] = ms
            row[f"{k}_gb_per_s"] = kv_bytes / (ms / 1e3) / 1e9
            line += f" {k} {ms:8.2f} ms {row[f'{k}_gb_per_s']:6.1f} GB/s |"
        if "baseline" in times:
            row["speedup"] = row["baseline_ms"] / row["current_ms"]
            line += f" speedup x{row['speedup']:.2f}"
        print(line, flush=True)
        rows.append(row)
    print(f"load average at end: {os.getloadavg()[0]:.2f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(baseline_rev=args.baseline_rev, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
