"""Dense causal attention over one sequence: the no-cache reference used by `Model.forward`.

It materialises the full [nH, T, T] score matrix, so it is for tests and short prompts, not serving.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp


def dense_causal_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    sm_scale: float,
    sliding_window: int | None = None,
    positions: jax.Array | None = None,
    soft_cap: float | None = None,
) -> jax.Array:
    """Causal (optionally sliding-window) attention of one sequence.

    q [T, nH, D], k/v [T, nKV, D] with nH % nKV == 0; positions [T] int32 (default arange(T)).
    Query at position p sees keys at positions in (p - sliding_window, p]. Softmax in f32.
    soft_cap: scores (after sm_scale) -> soft_cap * tanh(scores / soft_cap), as the paged kernels.
    Returns [T, nH, D] in q.dtype.
    """
    t, nh, d = q.shape
    nkv = k.shape[1]
    group = nh // nkv
    if positions is None:
        positions = jnp.arange(t, dtype=jnp.int32)
    # GQA without repeating K/V: view the query heads as [nKV, group] so each KV head serves its
    # group by broadcasting (HF's repeat_kv orders query heads the same way: head h -> kv h // group).
    qg = q.reshape(t, nkv, group, d)
    scores = jnp.einsum("qkgd,skd->kgqs", qg, k, preferred_element_type=jnp.float32) * sm_scale
    if soft_cap is not None:
        scores = soft_cap * jnp.tanh(scores / soft_cap)
    qpos = positions[:, None]
    kpos = positions[None, :]
    mask = kpos <= qpos  # [Tq, Tk]
    if sliding_window is not None:
        mask = mask & (kpos > qpos - sliding_window)
    scores = jnp.where(mask[None, None], scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1)  # every query sees itself, so no all-masked rows
    out = jnp.einsum("kgqs,skd->qkgd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(t, nh, d).astype(q.dtype)


def make_dense_attention(config, positions: jax.Array | None = None) -> Callable:
    """The `attention(layer_idx, q, k, v, kv_cache_layer)` callable for llama.forward, no KV cache.

    Reads each layer's window from config.layer_sliding_windows, the scale and soft-cap from
    config.sm_scale / config.attn_logit_softcap; passes kv_cache_layer through.
    """
    sm_scale = config.sm_scale

    def attention(layer_idx, q, k, v, kv_cache_layer):
        out = dense_causal_attention(
            q, k, v, sm_scale=sm_scale,
            sliding_window=config.layer_sliding_windows[layer_idx], positions=positions,
            soft_cap=config.attn_logit_softcap,
        )
        return out, kv_cache_layer

    return attention
