"""Llama / Mistral / Qwen2 / Qwen3 / Gemma 3 decoder as pure functions over the params pytree.

The architectures differ only by ModelConfig fields: qkv bias (Qwen2), per-head q/k RMSNorm
before RoPE (Qwen3, Gemma 3), sliding windows (Mistral, Qwen2, Gemma 3; read by the attention
callable), head_dim that need not equal hidden/heads, RoPE scaling, tied embeddings, and for
Gemma 3: (1 + w) norms with post-attention / post-MLP norms, embeddings scaled by sqrt(hidden),
GeGLU, a different RoPE base on sliding layers, its own attention scale (carried by the attention
callable, from config.sm_scale) and final logit soft-capping. Any GQA ratio works (MHA, MQA).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from jaxllm.models import layers, packed
from jaxllm.models.model_config import ModelConfig

# attention(layer_idx: int | layers.LayerChoice, q, k, v, kv_cache_layer) -> (out, kv_cache_layer)
Attention = Callable[[Any, jax.Array, jax.Array, jax.Array, Any], tuple[jax.Array, Any]]


def forward(
    params: dict,
    config: ModelConfig,
    token_ids: jax.Array,
    positions: jax.Array,
    kv_caches: list | None,
    attention: Attention,
    residual_hook: Callable[[int, jax.Array], jax.Array] | None = None,
) -> tuple[jax.Array, list | None]:
    """Run the decoder stack.

    token_ids [T] int32, positions [T] int32 (RoPE positions; the attention callable decides who
    attends to whom, with config.sm_scale, config.attn_logit_softcap and the layer's window).
    kv_caches: list with one entry per layer, or None (each entry is passed to `attention` and
    replaced by what it returns). Returns (hidden [T, H] after the final norm, kv_caches).
    residual_hook(i, x [T, H]) -> [T, H], called while tracing: at the input of each layer i
    (transformers' hidden_states[i]), its result continues as the residual; and once with
    (num_layers, final hidden), its result returned (hidden-state capture, interventions).
    """
    x = embed(params["embed"], config, token_ids)  # [T, H]
    new_caches = [] if kv_caches is not None else None
    for i, lp in enumerate(params["layers"]):
        if residual_hook is not None:
            x = residual_hook(i, x)
        cache_i = kv_caches[i] if kv_caches is not None else None
        x, cache_i = decoder_layer(lp, config, x, positions, i, cache_i, attention)
        if new_caches is not None:
            new_caches.append(cache_i)
    x = final_norm(params["final_norm"], config, x)
    if residual_hook is not None:
        x = residual_hook(len(params["layers"]), x)
    return x, new_caches


def _per_token(config: ModelConfig):
    """How per-token blocks run: directly, or in batch-invariant mode over fixed row tiles
    (layers.row_tiled): XLA's fusion and vectorisation of even elementwise ops and row reductions
    change with the token count, and with them the rounding, so only a fixed-shape loop body is stable."""
    return functools.partial(layers.row_tiled, row_tile=layers.ROW_TILE if config.batch_invariant else None)


def _norm(config: ModelConfig):
    return layers.gemma_rms_norm if config.gemma_norms else layers.rms_norm


def embed(table: jax.Array, config: ModelConfig, token_ids: jax.Array) -> jax.Array:
    """token_ids [T] -> embeddings [T, H] from `table` [V, H] (Gemma 3: scaled by sqrt(H))."""
    if isinstance(table, packed.PackedWeight):  # a tied table packed for the LM head (packed.py)
        x = packed.embedding_rows(table, token_ids)
    else:
        x = jnp.take(table, token_ids, axis=0)
    if config.scale_embeddings:
        # The scale is rounded to the model dtype first, as transformers does (bf16: 25.25 for
        # sqrt(640) = 25.30); the rounding is part of what the checkpoint was trained with.
        x = x * jnp.asarray(config.hidden_size**0.5, x.dtype)
    return x


def final_norm(weight: jax.Array, config: ModelConfig, x: jax.Array) -> jax.Array:
    """The norm after the last layer: x [T, H] -> [T, H]."""
    norm = _norm(config)
    return _per_token(config)(lambda xt: norm(xt, weight, config.rms_norm_eps), x)


def decoder_layer(lp: dict, config: ModelConfig, x: jax.Array, positions: jax.Array, layer_idx,
                  kv_cache, attention: Attention) -> tuple[jax.Array, Any]:
    """One decoder layer on the residual stream x [T, H] at RoPE positions [T]: returns
    (x [T, H], the layer's new KV cache entry). layer_idx (an int, or a layers.LayerChoice made
    at run time among layers of different signatures) picks the layer's RoPE and is passed to
    `attention` (which reads the layer's sliding window); kv_cache: the layer's entry (None: no cache)."""
    per_token, norm = _per_token(config), _norm(config)
    q, k, v = per_token(lambda xt, pt: _attention_inputs(lp, config, norm, layer_idx, xt, pt), x, positions)
    attn, kv_cache = attention(layer_idx, q, k, v, kv_cache)  # [T, nH, D]
    x = per_token(lambda xt, at: _attention_output_and_mlp(lp, config, norm, xt, at), x, attn)
    return x, kv_cache


def layer_signature(config: ModelConfig, layer_idx: int) -> tuple:
    """The static facts of layer `layer_idx` that decoder_layer and the paged attention read (its
    RoPE and sliding window): two layers with equal signatures (and equal param shapes) run the
    same program, so a layered step compiles one decoder-layer executable per distinct signature
    (Llama: 1; Gemma 3: sliding and global). Must name everything decoder_layer reads by index."""
    return (config.layer_ropes[layer_idx], config.layer_sliding_windows[layer_idx])


def _attention_inputs(lp: dict, config: ModelConfig, norm, layer_idx, x: jax.Array, positions: jax.Array):
    """x [t, H], positions [t] -> q [t, nH, D], k and v [t, nKV, D], RoPE applied (per token)."""
    t, nh, nkv, d, eps = x.shape[0], config.num_heads, config.num_kv_heads, config.head_dim, config.rms_norm_eps
    cos, sin = layers.per_layer(  # [t, D]
        layer_idx, lambda i, p: layers.rope_cos_sin(p, config.layer_ropes[i], d, x.dtype), positions)
    h = norm(x, lp["attn_norm"], eps)
    q = layers.linear(h, lp["q_proj"], lp.get("q_bias")).reshape(t, nh, d)
    k = layers.linear(h, lp["k_proj"], lp.get("k_bias")).reshape(t, nkv, d)
    v = layers.linear(h, lp["v_proj"], lp.get("v_bias")).reshape(t, nkv, d)
    if config.qk_norm:
        # Qwen3 and Gemma 3 normalise each head before rotating it.
        q = norm(q, lp["q_norm"], eps)
        k = norm(k, lp["k_norm"], eps)
    return layers.apply_rope(q, cos, sin), layers.apply_rope(k, cos, sin), v


def _attention_output_and_mlp(lp: dict, config: ModelConfig, norm, x: jax.Array, attn: jax.Array) -> jax.Array:
    """Residual x [t, H] and attention output [t, nH, D] -> the layer's output [t, H] (per token)."""
    eps = config.rms_norm_eps
    h = layers.linear(attn.reshape(x.shape[0], -1), lp["o_proj"])
    if config.gemma_norms:
        h = norm(h, lp["post_attn_norm"], eps)
    x = x + h
    h = norm(x, lp["mlp_norm"], eps)
    h = layers.gated_mlp(h, lp["gate_proj"], lp["up_proj"], lp["down_proj"], config.hidden_act)
    if config.gemma_norms:
        h = norm(h, lp["post_mlp_norm"], eps)
    return x + h


def compute_logits(params: dict, config: ModelConfig, hidden: jax.Array) -> jax.Array:
    """hidden [N, H] -> logits [N, V] float32 (lm_head, or the embedding when tied; soft-capped
    when config.final_logit_softcap is set; row-tiled in batch-invariant mode)."""
    w = params["embed"] if config.tie_word_embeddings else params["lm_head"]
    if isinstance(w, packed.PackedWeight):  # matmul_backend "cpu": the kernel over the packed head
        return layers.softcap(packed.packed_matmul(hidden, w), config.final_logit_softcap)
    w = w.astype(hidden.dtype)  # tied: the table [V, H]; else lm_head [H, V]
    if config.tie_word_embeddings:
        # Batch-invariant mode keeps the [N, V] dot: its bitwise equality across TP / PP
        # layouts was verified with that form only.
        head = functools.partial(_tied_head, w, allow_transposed=not config.batch_invariant and jax.default_backend() == "cpu")
    else:
        head = lambda x: jnp.matmul(x, w, preferred_element_type=jnp.float32)  # noqa: E731
    logits = layers.row_tiled(head, hidden, row_tile=layers.ROW_TILE if config.batch_invariant else None)
    return layers.softcap(logits, config.final_logit_softcap)


# Row counts up to which the tied head runs as table @ x^T (see _tied_head).
TIED_HEAD_TRANSPOSED_MAX_ROWS = 64


def _tied_head(table: jax.Array, x: jax.Array, allow_transposed: bool = True) -> jax.Array:
    """x [N, H] against the embedding table [V, H] -> logits [N, V] f32.

    For a decode step's few rows XLA:CPU is faster computing table @ x^T ([V, N]: the table's
    V rows are the dot's long side) and transposing that small result, than the [N, V] dot
    (SmolLM2, 32 rows: 14-16 instead of 20-22 ms, experiments/profile_step.py "head"); the
    barrier keeps XLA from folding the transpose back into the dot's output layout. Only on the
    CPU platform (allow_transposed): a TPU would put the few rows on its 128-wide lane axis."""
    if not allow_transposed or x.shape[0] > TIED_HEAD_TRANSPOSED_MAX_ROWS:
        return jnp.einsum("nh,vh->nv", x, table, preferred_element_type=jnp.float32)
    return jax.lax.optimization_barrier(jnp.einsum("vh,nh->vn", table, x, preferred_element_type=jnp.float32)).T
