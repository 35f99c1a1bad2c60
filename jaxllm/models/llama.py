"""Llama / Mistral / Qwen2 / Qwen3 decoder as pure functions over the params pytree.

The four architectures differ only by ModelConfig fields: qkv bias (Qwen2), per-head q/k RMSNorm
before RoPE (Qwen3), sliding windows (Mistral; read by the attention callable), head_dim that need
not equal hidden/heads, llama3 RoPE scaling, and tied embeddings. Any GQA ratio works (MHA, MQA).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from jaxllm.models import layers
from jaxllm.models.model_config import ModelConfig

Attention = Callable[[int, jax.Array, jax.Array, jax.Array, Any], tuple[jax.Array, Any]]


def forward(
    params: dict,
    config: ModelConfig,
    token_ids: jax.Array,
    positions: jax.Array,
    kv_caches: list | None,
    attention: Attention,
) -> tuple[jax.Array, list | None]:
    """Run the decoder stack.

    token_ids [T] int32, positions [T] int32 (RoPE positions; the attention callable decides who
    attends to whom). kv_caches: list with one entry per layer, or None (each entry is passed to
    `attention` and replaced by what it returns). Returns (hidden [T, H] after the final norm,
    kv_caches).
    """
    dtype = params["embed"].dtype
    t = token_ids.shape[0]
    nh, nkv, d = config.num_heads, config.num_kv_heads, config.head_dim
    eps = config.rms_norm_eps
    cos, sin = layers.rope_cos_sin(positions, config.rope, d, dtype)  # [T, D] each, shared by layers

    x = jnp.take(params["embed"], token_ids, axis=0)  # [T, H]
    new_caches = [] if kv_caches is not None else None
    for i, lp in enumerate(params["layers"]):
        h = layers.rms_norm(x, lp["attn_norm"], eps)
        q = layers.linear(h, lp["q_proj"], lp.get("q_bias")).reshape(t, nh, d)
        k = layers.linear(h, lp["k_proj"], lp.get("k_bias")).reshape(t, nkv, d)
        v = layers.linear(h, lp["v_proj"], lp.get("v_bias")).reshape(t, nkv, d)
        if config.qk_norm:
            # Qwen3 normalises each head before rotating it.
            q = layers.rms_norm(q, lp["q_norm"], eps)
            k = layers.rms_norm(k, lp["k_norm"], eps)
        q = layers.apply_rope(q, cos, sin)
        k = layers.apply_rope(k, cos, sin)
        cache_i = kv_caches[i] if kv_caches is not None else None
        attn, cache_i = attention(i, q, k, v, cache_i)  # [T, nH, D]
        if new_caches is not None:
            new_caches.append(cache_i)
        x = x + layers.linear(attn.reshape(t, nh * d), lp["o_proj"])
        h = layers.rms_norm(x, lp["mlp_norm"], eps)
        x = x + layers.swiglu_mlp(h, lp["gate_proj"], lp["up_proj"], lp["down_proj"])
    return layers.rms_norm(x, params["final_norm"], eps), new_caches


def compute_logits(params: dict, config: ModelConfig, hidden: jax.Array) -> jax.Array:
    """hidden [N, H] -> logits [N, V] float32 (lm_head, or the embedding when tied)."""
    if config.tie_word_embeddings:
        w = params["embed"]  # [V, H]
        return jnp.einsum("nh,vh->nv", hidden, w.astype(hidden.dtype), preferred_element_type=jnp.float32)
    return jnp.matmul(hidden, params["lm_head"].astype(hidden.dtype), preferred_element_type=jnp.float32)
