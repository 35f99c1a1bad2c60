"""Measure this machine's roofline with JAX: peak matmul FLOP/s and memory bandwidth.

    python experiments/roofline.py            # prints JSON

Both numbers are what *JAX on this backend* achieves with one big, simple op, which is the ceiling
a jitted model step can hope for (not the datasheet). The machine is shared, so we take the best
of a few repetitions (best = least disturbed by other processes).

* matmul: [n, n] @ [n, n] f32, 2 n^3 FLOPs.
* bandwidth: a reduction `x.sum()` over a buffer much larger than the caches (pure streaming read,
  the access pattern of weight loading in a decode step), and a copy `x + 1` (read + write).
"""

from __future__ import annotations

import json
import time


def _best_time(fn, *args, reps: int) -> float:
    fn(*args).block_until_ready()  # compile + first touch
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn(*args).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return best


def measure_roofline(matmul_n: int = 2048, bw_bytes: int = 256 << 20, reps: int = 5) -> dict:
    """Returns {"matmul_flops": FLOP/s, "read_bandwidth": B/s, "copy_bandwidth": B/s, ...}.

    matmul_n: side of the square f32 matmul. bw_bytes: buffer size for the bandwidth tests
    (256 MiB: far above L3, below the free RAM of a shared 24 GiB box).
    """
    import jax
    import jax.numpy as jnp

    key = jax.random.PRNGKey(0)
    a = jax.random.normal(key, (matmul_n, matmul_n), jnp.float32)
    b = jax.random.normal(jax.random.fold_in(key, 1), (matmul_n, matmul_n), jnp.float32)
    t_mm = _best_time(jax.jit(jnp.matmul), a, b, reps=reps)

    x = jnp.ones((bw_bytes // 4,), jnp.float32)
    t_read = _best_time(jax.jit(jnp.sum), x, reps=reps)
    # Donated so the output reuses the input buffer: a fresh 256 MiB output each call would time
    # the kernel's page faults (first touch), not the memory bus.
    inc = jax.jit(lambda v: v + 1.0, donate_argnums=0)
    x = inc(x).block_until_ready()
    t_copy = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        x = inc(x).block_until_ready()
        t_copy = min(t_copy, time.perf_counter() - t0)
    del a, b, x
    return {
        "matmul_flops": 2 * matmul_n**3 / t_mm,
        "read_bandwidth": bw_bytes / t_read,
        "copy_bandwidth": 2 * bw_bytes / t_copy,  # bytes read + bytes written
        "matmul_n": matmul_n,
        "bw_buffer_bytes": bw_bytes,
        "reps": reps,
        "backend": jax.default_backend(),
    }


def roofline_time(flops: float, bytes_moved: float, roof: dict) -> float:
    """Lower bound on the time of a step that does `flops` and moves `bytes_moved` (reads)."""
    return max(flops / roof["matmul_flops"], bytes_moved / roof["read_bandwidth"])


if __name__ == "__main__":
    r = measure_roofline()
    print(json.dumps(r, indent=2))
    print(f"matmul {r['matmul_flops'] / 1e9:.0f} GFLOP/s, read {r['read_bandwidth'] / 1e9:.1f} GB/s, "
          f"copy {r['copy_bandwidth'] / 1e9:.1f} GB/s")
