"""Per-bucket microbenchmark of ragged paged attention: achieved KV bandwidth.

    python experiments/bench_attention.py [--backend auto|reference|pallas] [--interpret]
                                          [--dtype bfloat16] [--out results.json]

For each bucket (a token count T, a batch composition and a context length) it times one layer's
attention and reports unique K/V bytes read (sum over sequences of 2 * kv_len * nKV * D * itemsize)
divided by time, plus that as a fraction of the device's peak HBM bandwidth when known.

On an accelerator `auto` runs the Pallas kernel for the platform (jaxllm.attention.pallas). On CPU
`auto` runs the jnp reference; the kernel only runs with --interpret, and interpret-mode timings
measure the Pallas interpreter, NOT the kernel: they say nothing about performance.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from jaxllm.attention import reference  # noqa: E402

# Peak HBM bandwidth (bytes/s) by device_kind prefix, for the "fraction of peak" column.
PEAK_BW = {"TPU v5 lite": 819e9, "TPU v5e": 819e9, "TPU v6 lite": 1640e9, "TPU v5p": 2765e9,
           "TPU v4": 1200e9, "NVIDIA H100": 3.35e12, "NVIDIA H200": 4.8e12, "NVIDIA A100": 2.0e12}

# (name, T bucket, [(q_len, kv_len), ...]) — engine-like buckets.
BUCKETS = [
    ("decode-8x1k", 8, [(1, 1024)] * 8),
    ("decode-32x2k", 32, [(1, 2048)] * 32),
    ("decode-64x512", 64, [(1, 512)] * 64),
    ("prefill-512@512", 512, [(512, 512)]),
    ("prefill-chunk-512@2k", 512, [(512, 2048)]),
    ("mixed-480@2k+32dec", 512, [(480, 2048)] + [(1, 1024)] * 32),
]


def build(seqs, T, *, nKV, D, group, block_size, dtype, seed=0):
    rng = np.random.default_rng(seed)
    nb = [-(-kv // block_size) for _, kv in seqs]
    max_blocks = max(nb)
    num_blocks = 1 + sum(nb)
    perm = rng.permutation(np.arange(1, num_blocks))
    bt = np.zeros((len(seqs), max_blocks), np.int32)
    o = 0
    for s, n in enumerate(nb):
        bt[s, :n] = perm[o:o + n]
        o += n
    kv_lens = np.array([kv for _, kv in seqs], np.int32)
    cu = np.concatenate([[0], np.cumsum([q for q, _ in seqs])]).astype(np.int32)
    shape = (num_blocks, block_size, nKV, D)
    k = jnp.asarray(rng.standard_normal(shape, np.float32), dtype)
    v = jnp.asarray(rng.standard_normal(shape, np.float32), dtype)
    q = jnp.asarray(rng.standard_normal((T, nKV * group, D), np.float32), dtype)
    return q, k, v, jnp.asarray(kv_lens), jnp.asarray(bt), jnp.asarray(cu)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", default="auto", choices=["auto", "reference", "pallas"])
    ap.add_argument("--interpret", action="store_true", help="on CPU, also run the kernel in interpret mode")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--num-kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--buckets", default="", help="comma-separated bucket names (default: all)")
    ap.add_argument("--out", default="")
    args = ap.parse_args()

    platform = jax.default_backend()
    device_kind = jax.devices()[0].device_kind
    peak = next((bw for k, bw in PEAK_BW.items() if device_kind.startswith(k)), None)
    on_cpu = platform == "cpu"
    backends = []
    if args.backend in ("auto", "reference") and (on_cpu or args.backend == "reference"):
        backends.append("reference")
    if args.backend == "pallas" or (args.backend == "auto" and not on_cpu):
        backends.append("pallas")
    if on_cpu and args.interpret and "pallas" not in backends:
        backends.append("pallas")
    if on_cpu and "pallas" in backends:
        print("WARNING: on CPU the Pallas kernel runs in INTERPRET mode; its timings measure the "
              "interpreter and are not performance numbers.")
    if on_cpu:
        print("NOTE: CPU run: numbers are for the jnp reference (the engine's CPU path), not a kernel.")

    dtype = jnp.dtype(args.dtype)
    sm_scale = args.head_dim ** -0.5
    names = set(args.buckets.split(",")) if args.buckets else None
    rows = []
    for name, T, seqs in BUCKETS:
        if names and name not in names:
            continue
        inputs = build(seqs, T, nKV=args.num_kv_heads, D=args.head_dim, group=args.group,
                       block_size=args.block_size, dtype=dtype)
        kv_bytes = sum(2 * kv * args.num_kv_heads * args.head_dim * dtype.itemsize for _, kv in seqs)
        for backend in backends:
            if backend == "reference":
                fn = jax.jit(lambda *a: reference.ragged_paged_attention(*a, sm_scale=sm_scale))
            else:
                from jaxllm.attention import pallas as adapter

                fn = jax.jit(lambda *a: adapter.ragged_paged_attention(*a, sm_scale=sm_scale))
            iters = 1 if (on_cpu and backend == "pallas") else args.iters
            fn(*inputs).block_until_ready()  # compile + warm up
            t0 = time.perf_counter()
            for _ in range(iters):
                out = fn(*inputs)
            out.block_until_ready()
            dt = (time.perf_counter() - t0) / iters
            bw = kv_bytes / dt
            row = dict(bucket=name, backend=backend, platform=platform, device_kind=device_kind,
                       interpret=on_cpu and backend == "pallas", T=T, num_seqs=len(seqs),
                       kv_bytes=kv_bytes, time_s=dt, kv_gb_per_s=bw / 1e9,
                       frac_peak=(bw / peak) if peak else None)
            rows.append(row)
            frac = f"{bw / peak:6.1%}" if peak else "   n/a"
            tag = " (INTERPRET: not performance)" if row["interpret"] else ""
            print(f"{name:24s} {backend:9s} {dt * 1e3:9.2f} ms  {bw / 1e9:8.2f} GB/s  peak {frac}{tag}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
