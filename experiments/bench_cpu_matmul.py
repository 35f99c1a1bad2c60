"""The CPU matmul kernel over packed weights (jaxllm/models/packed.py, matmul_backend="cpu")
against XLA:CPU's dots, at SmolLM2-135M's shapes, in one process.

    python experiments/bench_cpu_matmul.py                 # rows 1 ... 512
    python experiments/bench_cpu_matmul.py --rows 8 32 --reps 30

Two programs per row count M, each jitted:
  layers  the projections of 30 decoder layers (q, k, v, o, gate, up, down; a norm between
          layers keeps the values in range), with 30 distinct weight sets so the 425 MB of
          weights stream from DRAM as in a decode step;
  head    the tied LM head, x [M, 576] against the table [49152, 576] (XLA: the engine's
          llama._tied_head, table @ x^T up to 64 rows; the kernel: the table packed transposed).
Printed per M: best-of-reps ms of XLA and of the kernel, weight GB/s and GFLOP/s, the ratio, and
the largest relative difference of the outputs. This machine's roofline is measured first
(jaxllm/bench/roofline.py): compare the ratios, measured side by side, not absolute times.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.bench.roofline import measure_roofline
from jaxllm.models import llama, packed

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from profile_step import best_ms  # noqa: E402

H, I, Q, KV, V, LAYERS = 576, 1536, 576, 192, 49152, 30
SHAPES = dict(q=(H, Q), k=(H, KV), v=(H, KV), o=(Q, H), g=(H, I), u=(H, I), d=(I, H))


def layer_stack(linear, weights, h):
    """h [M, H] through the projections of every layer: linear(h, w, name) -> h @ w[name]."""
    for w in weights:
        q, k, v = linear(h, w, "q"), linear(h, w, "k"), linear(h, w, "v")
        h = h + linear(q + jnp.pad(k + v, ((0, 0), (0, Q - KV))), w, "o")
        h = h + 0.1 * linear(jax.nn.silu(linear(h, w, "g")) * linear(h, w, "u"), w, "d")
        h = h / jnp.sqrt(jnp.mean(h * h, -1, keepdims=True))
    return h


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64, 128, 512])
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    args = p.parse_args(argv)
    if not packed.available():
        raise SystemExit(f"the CPU matmul kernel is unavailable: {packed.unavailable_reason()}")
    roof = measure_roofline(reps=3)
    print(f"machine: matmul {roof['matmul_flops'] / 1e9:.0f} GFLOP/s, read {roof['read_bandwidth'] / 1e9:.1f} GB/s; "
          f"panel width {packed.panel_width()}")
    rng = np.random.default_rng(0)
    plain = [{n: jnp.asarray(rng.standard_normal(s, dtype=np.float32) * 0.03) for n, s in SHAPES.items()}
             for _ in range(LAYERS)]
    packed_w = [{n: packed.pack(w) for n, w in ws.items()} for ws in plain]
    table = jnp.asarray(rng.standard_normal((V, H), dtype=np.float32) * 0.03)
    table_packed = packed.pack(table, transposed=True)
    programs = {
        "layers": (jax.jit(lambda ws, h: layer_stack(lambda x, w, n: x @ w[n], ws, h)),
                   jax.jit(lambda ws, h: layer_stack(lambda x, w, n: packed.packed_matmul(x, w[n]), ws, h)),
                   plain, packed_w, sum(w.size for ws in plain for w in ws.values()) * 4),
        "head": (jax.jit(llama._tied_head), jax.jit(lambda w, x: packed.packed_matmul(x, w)), table, table_packed, V * H * 4),
    }
    rows = []
    for name, (xla_fn, kernel_fn, xla_w, kernel_w, weight_bytes) in programs.items():
        for m in args.rows:
            x = jnp.asarray(rng.standard_normal((m, H), dtype=np.float32))
            a, b = np.asarray(xla_fn(xla_w, x)), np.asarray(kernel_fn(kernel_w, x))
            rel = float(np.max(np.abs(a - b)) / np.max(np.abs(a)))
            t_xla = best_ms(lambda: xla_fn(xla_w, x), args.reps)
            t_kernel = best_ms(lambda: kernel_fn(kernel_w, x), args.reps)
            flops = 2 * m * weight_bytes / 4
            row = {"program": name, "rows": m, "xla_ms": t_xla, "kernel_ms": t_kernel, "speedup": t_xla / t_kernel,
                   "kernel_gbps": weight_bytes / t_kernel / 1e6, "kernel_gflops": flops / t_kernel / 1e6,
                   "xla_gbps": weight_bytes / t_xla / 1e6, "xla_gflops": flops / t_xla / 1e6, "max_rel_diff": rel}
            rows.append(row)
            print(f"{name:6s} M={m:4d}  xla {t_xla:7.2f} ms ({row['xla_gbps']:5.1f} GB/s {row['xla_gflops']:6.1f} "
                  f"GFLOP/s)  kernel {t_kernel:7.2f} ms ({row['kernel_gbps']:5.1f} GB/s {row['kernel_gflops']:6.1f} "
                  f"GFLOP/s)  {row['speedup']:.2f}x  rel diff {rel:.1e}", flush=True)
    result = {"roofline": roof, "panel_width": packed.panel_width(), "rows": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
