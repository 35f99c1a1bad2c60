"""Building blocks of the decoder forward: RMSNorm (Llama and Gemma), rotary embeddings, gated MLP,
and per_layer (what a layer reads by index, for a layer chosen at run time).

All functions are pure jnp; numerics follow transformers so that fp32 parity is tight:
RMSNorm and RoPE tables are computed in float32 and cast back to the activation dtype.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.models import packed
from jaxllm.models.model_config import RopeConfig


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """RMSNorm over the last axis. x [..., H], weight [H] -> [..., H] in x.dtype.

    As transformers' LlamaRMSNorm: normalise in f32, cast back to x.dtype, *then* multiply by the
    weight (the order matters for bf16 bit-parity).
    """
    xf = x.astype(jnp.float32)
    var = jnp.mean(xf * xf, axis=-1, keepdims=True)
    normed = (xf * jax.lax.rsqrt(var + eps)).astype(x.dtype)
    return weight.astype(x.dtype) * normed


def gemma_rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """Gemma's RMSNorm over the last axis. x [..., H], weight [H] -> [..., H] in x.dtype.

    Scales by (1 + weight), the weight stored as an offset from 1 (so 0 is identity), and
    multiplies in f32 *before* the cast back: the other order than `rms_norm`, as transformers'
    Gemma3RMSNorm (they differ in bf16 only).
    """
    xf = x.astype(jnp.float32)
    var = jnp.mean(xf * xf, axis=-1, keepdims=True)
    return (xf * jax.lax.rsqrt(var + eps) * (1.0 + weight.astype(jnp.float32))).astype(x.dtype)


def softcap(x: jax.Array, cap: float | None) -> jax.Array:
    """cap * tanh(x / cap) (Gemma's logit soft-capping); x unchanged when cap is None."""
    return x if cap is None else cap * jnp.tanh(x / cap)


@functools.lru_cache(maxsize=None)
def rope_inv_freq(rope: RopeConfig, head_dim: int) -> np.ndarray:
    """Inverse frequencies [head_dim // 2] float32, computed once per (rope, head_dim) in numpy.

    Mirrors transformers' default RoPE and `_compute_llama3_parameters` (float32 throughout,
    like torch there), so the tables match to the last ulp or so.
    """
    exponent = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    inv_freq = (1.0 / (np.float32(rope.theta) ** exponent)).astype(np.float32)
    if rope.rope_type == "default":
        return inv_freq
    if rope.rope_type == "linear":  # transformers' _compute_linear_scaling_rope_parameters
        return (inv_freq / np.float32(rope.factor)).astype(np.float32)
    if rope.rope_type != "llama3":
        raise ValueError(f"unsupported rope_type {rope.rope_type!r}")
    factor = rope.factor
    old_ctx = rope.original_max_position_embeddings
    low_freq_wavelen = old_ctx / rope.low_freq_factor
    high_freq_wavelen = old_ctx / rope.high_freq_factor
    wavelen = (2 * math.pi / inv_freq).astype(np.float32)
    # Long wavelengths (low frequencies) are slowed down by `factor`; short ones are kept;
    # the band in between is interpolated smoothly.
    inv_freq_llama = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq).astype(np.float32)
    smooth = ((old_ctx / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)).astype(np.float32)
    smoothed = ((1 - smooth) * inv_freq_llama / factor + smooth * inv_freq_llama).astype(np.float32)
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return np.where(is_medium, smoothed, inv_freq_llama).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class LayerChoice:
    """A decoder layer known only at run time: one of `reps` (static layer indices whose
    llama.layer_signature differ). The pipeline tick runs local slot j of every stage with one
    program although it is a different model layer on each (parallel/pipeline.py::slot_variants)."""

    kind: jax.Array  # [] int32, this device's index into reps
    reps: tuple[int, ...]


def per_layer(layer, fn, *operands):
    """fn(layer_idx, *operands) for what a layer reads by index (its RoPE, its window): called
    directly for a static int layer; for a LayerChoice, a lax.switch over its reps, each branch
    with its static facts (a device runs only its own). Callers keep KV-cache writes outside
    `fn`: a cache updated inside a branch is copied whole (XLA cannot alias a conditional's
    operand to its result), a cache only read inside one is not."""
    if isinstance(layer, LayerChoice):
        return jax.lax.switch(layer.kind, [functools.partial(fn, rep) for rep in layer.reps], *operands)
    return fn(layer, *operands)


def rope_cos_sin(positions: jax.Array, rope: RopeConfig, head_dim: int, dtype) -> tuple[jax.Array, jax.Array]:
    """cos, sin tables [T, head_dim] in `dtype` for positions [T] int32 (HF layout: freqs repeated twice)."""
    inv_freq = jnp.asarray(rope_inv_freq(rope, head_dim))  # [D/2] f32, a trace-time constant
    freqs = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]  # [T, D/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)  # [T, D]
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def rotate_half(x: jax.Array) -> jax.Array:
    """[..., D] -> [..., D]: (x1, x2) -> (-x2, x1), the HF Llama convention (halves, not interleaved)."""
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [T, heads, D], cos/sin [T, D] -> [T, heads, D]."""
    cos = cos[:, None, :]
    sin = sin[:, None, :]
    return x * cos + rotate_half(x) * sin


# Rows per tile in batch-invariant mode (EngineConfig.batch_invariant). Measured on XLA:CPU
# (jax 0.10.2, f32): row r of x @ w is bitwise stable only while x's row count stays in one band
# ({1}, {2-56}, {>= 63} at 4096^2); a loop over fixed [ROW_TILE, IN] tiles was bitwise stable
# for every row count and row position. The forward tiles whole per-token blocks, not only the
# matmuls: the fusion of the norms and RoPE around them changes with the row count too.
ROW_TILE = 32


def row_tiled(fn, *xs, row_tile: int | None):
    """fn(*xs) for pytrees xs of per-row arrays [N, ...] (fn returns a pytree of [N, ...]
    arrays); with row_tile, fn runs on fixed [row_tile, ...] tiles of them (zero-padded to a
    multiple) in a loop, so each row's result never depends on N.

    XLA must see the same loop body whatever N: the trip count goes through an optimization
    barrier (or a one-tile loop would be removed), and the arrays get one spare tile (or a
    one-tile step's slices would cover whole arrays and be simplified away); either changes how
    the body's norms and matmuls are fused, and their rounding with it."""
    if row_tile is None:
        return fn(*xs)
    n = jax.tree.leaves(xs)[0].shape[0]
    num_tiles = -(-n // row_tile)
    rows = (num_tiles + 1) * row_tile
    padded = jax.tree.map(lambda x: jnp.pad(x, ((0, rows - n),) + ((0, 0),) * (x.ndim - 1)), xs)
    tile_in = jax.tree.map(lambda x: jax.ShapeDtypeStruct((row_tile, *x.shape[1:]), x.dtype), xs)
    tile_out = jax.eval_shape(fn, *tile_in)
    out = jax.tree.map(lambda a: jnp.zeros((rows, *a.shape[1:]), a.dtype), tile_out)

    def body(i, out):
        ys = fn(*jax.tree.map(lambda x: jax.lax.dynamic_slice_in_dim(x, i * row_tile, row_tile), padded))
        return jax.tree.map(lambda o, y: jax.lax.dynamic_update_slice_in_dim(o, y, i * row_tile, axis=0), out, ys)

    trips = jax.lax.optimization_barrier(jnp.int32(num_tiles))
    return jax.tree.map(lambda o: o[:n], jax.lax.fori_loop(0, trips, body, out))


def linear(x: jax.Array, w, b: jax.Array | None = None) -> jax.Array:
    """x [..., IN] @ w [IN, OUT] (+ b [OUT]) -> [..., OUT] in x.dtype.

    Accumulates in f32 (free on CPU/TPU for bf16, exact for f32) and casts back once. w may be a
    packed.PackedWeight (matmul_backend="cpu"): the CPU matmul kernel then does the product.
    """
    if isinstance(w, packed.PackedWeight):
        y = packed.packed_matmul(x, w)
    else:
        y = jnp.matmul(x, w.astype(x.dtype), preferred_element_type=jnp.float32)
    if b is not None:
        y = y + b.astype(jnp.float32)
    return y.astype(x.dtype)


_ACTIVATIONS = {
    "silu": jax.nn.silu,
    # transformers' "gelu_pytorch_tanh": the tanh approximation of GELU.
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
}


def gated_mlp(x: jax.Array, gate_w: jax.Array, up_w: jax.Array, down_w: jax.Array, act: str = "silu") -> jax.Array:
    """down(act(gate(x)) * up(x)): SwiGLU for act="silu", GeGLU (Gemma) for "gelu_pytorch_tanh".

    x [T, H], gate/up [H, I], down [I, H] -> [T, H].
    """
    gate = linear(x, gate_w)
    up = linear(x, up_w)
    return linear(_ACTIVATIONS[act](gate) * up, down_w)

