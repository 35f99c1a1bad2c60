"""The machine's roofline, measured with JAX at the start of a run, and a model's per-step cost
against it.

    roof = measure_roofline()                 # {"matmul_flops": FLOP/s, "read_bandwidth": B/s, ...}
    cost = ModelCost.from_hf_config(cfg)      # parameters, KV bytes per token
    frac = roofline_fraction(steps, duration, cost, roof)

Both peaks are what *JAX on this backend* achieves with one big, simple op, the ceiling a jitted
step can hope for (not the datasheet). The machine may be shared, so the best of a few
repetitions is taken. jax is imported only inside measure_roofline.

* matmul: [n, n] @ [n, n] f32, 2 n^3 FLOPs.
* bandwidth: a reduction `x.sum()` over a buffer much larger than the caches (the streaming read
  of weight loading in a decode step), and a copy `x + 1` (read + write).
"""

from __future__ import annotations

import dataclasses
import json
import time

import numpy as np


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


QUICK = dict(matmul_n=512, bw_bytes=16 << 20, reps=2)  # a smoke run's roofline: seconds, noisier


def roofline_time(flops: float, bytes_moved: float, roof: dict) -> float:
    """Lower bound on the time of a step that does `flops` and moves `bytes_moved` (reads)."""
    return max(flops / roof["matmul_flops"], bytes_moved / roof["read_bandwidth"])


@dataclasses.dataclass(frozen=True)
class ModelCost:
    """Per-token costs of a decoder, for roofline arithmetic (f32 unless dtype_bytes says otherwise)."""

    num_params: int  # all parameters (embedding counted once when tied)
    layer_params: int  # matmul weights of the decoder layers (q,k,v,o,gate,up,down)
    lm_head_params: int  # V * H
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    dtype_bytes: int

    @classmethod
    def from_hf_config(cls, cfg, dtype_bytes: int = 4) -> "ModelCost":
        h, i, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
        nh, nkv = cfg.num_attention_heads, cfg.num_key_value_heads
        d = getattr(cfg, "head_dim", None) or h // nh
        per_layer = h * nh * d + 2 * h * nkv * d + nh * d * h + 3 * h * i
        embed = cfg.vocab_size * h
        norms = L * 2 * h + h
        total = L * per_layer + embed + norms + (0 if cfg.tie_word_embeddings else embed)
        return cls(total, L * per_layer, embed, L, nh, nkv, d, dtype_bytes)

    @property
    def weight_bytes_per_step(self) -> int:
        """Weights every step must stream: all layer matmuls + the LM head (embedding gather is T rows)."""
        return (self.layer_params + self.lm_head_params) * self.dtype_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype_bytes

    def step_cost(self, q_lens: np.ndarray, kv_lens: np.ndarray, num_sampled: int) -> tuple[float, float]:
        """(FLOPs, bytes read) of one step with per-sequence q_lens / kv_lens ([S] each).

        FLOPs = 2 * layer_params per token + 2 * V * H per sampled row + attention
        (QK^T and PV: 4 * nH * D per (query, visible key) pair, causal within the chunk).
        Bytes = weights once + every visible K/V once.
        """
        q = np.asarray(q_lens, np.float64)
        k = np.asarray(kv_lens, np.float64)
        pairs = float(np.sum(q * k - q * (q - 1) / 2))
        flops = (2.0 * self.layer_params * q.sum() + 2.0 * self.lm_head_params * num_sampled
                 + 4.0 * self.num_layers * self.num_heads * self.head_dim * pairs)
        bytes_read = self.weight_bytes_per_step + self.kv_bytes_per_token * float(k.sum())
        return flops, bytes_read

    def step_cost_from_stats(self, step) -> tuple[float, float]:
        """(FLOPs, bytes) of a step-table row (StepStats fields). A row's context length is not
        recorded, only the sum: decode rows (one new token) attend to their own context, and a
        prefill row is taken to attend to its own chunk only (exact for first chunks; a later
        chunk's attention over its earlier ones is counted as decode-like context, once)."""
        q = [n for _, n in (json.loads(step["scheduled"]) if isinstance(step["scheduled"], str) else step["scheduled"])]
        prefill = [n for n in q if n > 1]
        prefill_ctx = sum(prefill)
        rest = max(int(step["num_context_tokens"]) - prefill_ctx, 0)
        q_lens = np.asarray(prefill + ([1] * (len(q) - len(prefill))), np.float64)
        n_rest = len(q) - len(prefill)
        # Spread the remaining context over the one-token rows (their attention work is linear in it).
        kv = np.asarray(prefill + ([rest / n_rest] * n_rest if n_rest else []), np.float64)
        if not n_rest and rest:
            kv = kv + rest / max(len(prefill), 1)
        return self.step_cost(q_lens, kv, num_sampled=len(q))


def roofline_fraction(steps, duration: float, cost: ModelCost, roof: dict) -> dict:
    """Achieved FLOP/s and weight bandwidth of a run's steps (a step table) against the peaks.

    fraction_of_roofline = sum over steps of max(FLOPs / peak FLOP/s, bytes / peak B/s) / wall
    time: 1.0 would mean every step ran as fast as its binding resource allows.
    `_device_only` divides by the steps' device time instead.
    """
    if steps is None or not len(steps):
        return {}
    costs = [cost.step_cost_from_stats(row) for _, row in steps.iterrows()]
    flops = sum(c[0] for c in costs)
    byts = sum(c[1] for c in costs)
    t_roof = sum(roofline_time(f, b, roof) for f, b in costs)
    t_dev = float(steps["device_time"].sum())
    weight_bw = len(steps) * cost.weight_bytes_per_step / duration
    return {
        "model_flops": flops, "achieved_flops_per_s": flops / duration,
        "flops_frac_of_peak": flops / duration / roof["matmul_flops"],
        "weight_bandwidth_B_per_s": weight_bw,
        "weight_bw_frac_of_peak": weight_bw / roof["read_bandwidth"],
        "bytes_read": byts,
        "roofline_time_s": t_roof,
        "fraction_of_roofline": t_roof / duration,
        "fraction_of_roofline_device_only": t_roof / t_dev if t_dev > 0 else None,
        "compute_bound_steps": int(sum(f / roof["matmul_flops"] > b / roof["read_bandwidth"] for f, b in costs)),
    }
