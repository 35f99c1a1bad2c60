"""Ragged paged attention for TPU (Pallas / Mosaic TPU).

Grid: one program per tile of `num_queries_per_block` consecutive query tokens ("parallel", so
megacore chips split tiles across cores). A tile owns every head: the wrapper lays q out as
[nKV, T * group, D] (row = token * group + q head within the KV group), so per KV head the tile is
a dense [Tq * group, D] matrix and GQA needs no strided q access.

Inside a program: for each sequence with tokens in the tile (range precomputed by the wrapper and
scalar-prefetched), for each step of `num_kv_blocks_per_step` KV blocks that some token of the tile
can see (causal / kv_len / sliding window bounds), K and V pages are DMA'd from HBM (the caches stay
in HBM: memory_space=ANY) into a double-buffered VMEM scratch. The DMA for the next step (or the
first step of the next sequence) is started before the current step computes, so HBM reads overlap
compute. Pages past kv_len are not fetched at all. The compute per KV head is a flash-attention
online-softmax update (f32 m / l / acc in VMEM scratch); rows belonging to other sequences of the
tile are masked out, so no per-row stores are needed. K/V rows past kv_len are zeroed before the
matmuls because 0 * NaN = NaN (stale / uninitialised VMEM or NaN-filled unused blocks).

Scalar prefetch (SMEM): kv_lens [S], block_tables flattened [S * max_blocks] (1-D: a 2-D SMEM
array pads its minor dim to 128 words), each sequence's q row range [2 * S], tile->sequence
ranges [2 * num_tiles].

batch_invariant=True (EngineConfig.batch_invariant): tiles of a fixed height aligned to absolute
positions per sequence (common.query_layout), so a token's output is bitwise the same whatever
else is in the step and however its prompt was chunked. The KV steps already are a fixed grid
(step k covers keys [k * C, (k + 1) * C)) folded in increasing order, and a step that is fully
masked for a row leaves its m, l and acc exactly unchanged (alpha = exp(0) = 1, p = 0), so which
steps a tile runs beyond a row's own does not change that row.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from .common import (MASK_VALUE, cdiv, double_buffered_seq_loop, from_tiles, kv_step_range,
                     query_layout, round_up, to_tiles, validate_inputs)

# Default rows (tokens * group) per tile. Decode tiles mostly hold one token per sequence, so every
# row beyond `group` is wasted VPU/MXU work for that sequence; 64 rows keeps decode below the VPU
# limit on v5e while giving prefill enough rows to amortise each K/V page read.
_TARGET_ROWS = 64
# Rows per tile in batch-invariant mode (aligned tiles hold one sequence each).
_INVARIANT_ROWS = 16
# Default KV tokens per compute step (several blocks: fewer, larger DMAs and matmuls).
_TARGET_STEP_TOKENS = 128


def _load_head(buf_ref, slot, h, nKV, C, D, dtype):
    """Rows of KV head h from a [2, nb, bs, nKV, D] VMEM buffer, as [C = nb * bs, D].

    The buffer holds whole pages (one contiguous DMA per page); a head is a stride-nKV row
    subset of the flattened buffer. 16-bit dtypes pack two rows per 32-bit sublane word, which
    Mosaic cannot stride-load at an odd offset, so (as jax's own RPA kernel does) load the u32 view
    and unpack the half we need.
    """
    flat = buf_ref.at[slot].reshape(C * nKV, D)
    if nKV == 1:
        return flat[...]
    itemsize = jnp.dtype(dtype).itemsize
    if itemsize == 4:
        return flat[pl.ds(h, C, stride=nKV), :]
    assert itemsize == 2 and nKV % 2 == 0, (dtype, nKV)  # checked by the wrapper
    words = flat.bitcast(jnp.uint32)  # [C * nKV / 2, D], word r = rows (2r, 2r+1)
    b = words[pl.ds(h // 2, C, stride=nKV // 2), :]
    half = (b << 16) if h % 2 == 0 else (b & jnp.uint32(0xFFFF0000))
    # A 16-bit float in the high half of a u32 is the same number as an f32.
    return pltpu.bitcast(half, jnp.float32).astype(dtype)


def _kernel(
    # scalar prefetch (SMEM)
    kv_lens_ref,  # [S]
    block_tables_ref,  # [S * max_blocks]
    q_bounds_ref,  # [2 * S]: (first, one past the last) q row of each sequence
    tile_seqs_ref,  # [2 * num_tiles]
    # inputs
    q_ref,  # [nKV, R, D] VMEM block, R = Tq * group
    k_hbm,  # [num_blocks, bs, nKV, D] HBM
    v_hbm,
    # outputs
    o_ref,  # [nKV, R, D]
    # scratch
    k_buf,  # [2, nb, bs, nKV, D]
    v_buf,
    sems,  # DMA [2 (k/v), 2 (slot)]
    m_ref,  # [nKV, R, 128] f32 (lane-replicated: Mosaic wants 128-lane tiles)
    l_ref,  # [nKV, R, 128] f32
    acc_ref,  # [nKV, R, D] f32
    *, sm_scale, sliding_window, soft_cap, group, max_blocks,
):
    nKV, R, D = q_ref.shape
    _, nb, bs, _, _ = k_buf.shape
    C = nb * bs
    Tq = R // group
    i = pl.program_id(0)
    tile_start = i * Tq
    tile_end = tile_start + Tq
    s_begin = tile_seqs_ref[2 * i]
    s_end = tile_seqs_ref[2 * i + 1]

    m_ref[...] = jnp.full(m_ref.shape, MASK_VALUE, jnp.float32)
    l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    def seq_steps(s):
        """(first step, end step) of KV steps sequence s needs for this tile's tokens."""
        return kv_step_range(q_bounds_ref[2 * s], q_bounds_ref[2 * s + 1], kv_lens_ref[s], tile_start,
                             tile_end, C, sliding_window)

    def page_copies(s, step, slot):
        n_pages = cdiv(kv_lens_ref[s], bs)
        out = []
        for j in range(nb):
            p = step * nb + j
            blk = block_tables_ref[s * max_blocks + jnp.minimum(p, max_blocks - 1)]
            kc = pltpu.make_async_copy(k_hbm.at[blk], k_buf.at[slot, j], sems.at[0, slot])
            vc = pltpu.make_async_copy(v_hbm.at[blk], v_buf.at[slot, j], sems.at[1, slot])
            out.append((p < n_pages, kc, vc))
        return out

    def start_fetch(s, step, slot):
        # Only pages below kv_len are fetched: a decode step over a short sequence moves just the
        # bytes it needs, and garbage block-table entries past kv_len are never dereferenced.
        for needed, kc, vc in page_copies(s, step, slot):
            @pl.when(needed)
            def _():
                kc.start()
                vc.start()

    def wait_fetch(s, step, slot):
        for needed, kc, vc in page_copies(s, step, slot):
            @pl.when(needed)
            def _():
                kc.wait()
                vc.wait()

    def compute(s, step, slot):
        q_start = q_bounds_ref[2 * s]
        q_end = q_bounds_ref[2 * s + 1]
        kv_len = kv_lens_ref[s]
        ctx = kv_len - (q_end - q_start) - q_start
        kv_start = step * C
        tok = tile_start + lax.broadcasted_iota(jnp.int32, (R, C), 0) // group
        col = kv_start + lax.broadcasted_iota(jnp.int32, (R, C), 1)
        pos = ctx + tok
        mask = (tok >= q_start) & (tok < q_end) & (col <= pos) & (col < kv_len)
        if sliding_window is not None:
            mask = mask & (col > pos - sliding_window)
        row_ok = (kv_start + lax.broadcasted_iota(jnp.int32, (C, D), 0)) < kv_len
        for h in range(nKV):
            k = _load_head(k_buf, slot, h, nKV, C, D, k_buf.dtype)
            v = _load_head(v_buf, slot, h, nKV, C, D, v_buf.dtype)
            k = jnp.where(row_ok, k.astype(jnp.float32), 0.0).astype(k.dtype)
            v = jnp.where(row_ok, v.astype(jnp.float32), 0.0).astype(v.dtype)
            q = q_ref[h]  # [R, D]
            if q.dtype != k.dtype:
                q = q.astype(jnp.float32)
                k = k.astype(jnp.float32)
                v = v.astype(jnp.float32)
            sc = lax.dot_general(q, k, (((1,), (1,)), ((), ())),
                                 preferred_element_type=jnp.float32) * sm_scale
            if soft_cap is not None:
                sc = soft_cap * jnp.tanh(sc / soft_cap)
            sc = jnp.where(mask, sc, MASK_VALUE)
            m_prev = jnp.max(m_ref[h], axis=1, keepdims=True)  # [R, 1]
            l_prev = jnp.max(l_ref[h], axis=1, keepdims=True)
            m_next = jnp.maximum(m_prev, jnp.max(sc, axis=1, keepdims=True))
            p = jnp.where(mask, jnp.exp(sc - m_next), 0.0)
            alpha = jnp.exp(m_prev - m_next)
            l_next = alpha * l_prev + jnp.sum(p, axis=1, keepdims=True)
            pv = lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                                 preferred_element_type=jnp.float32)
            acc_ref[h] = alpha * acc_ref[h] + pv
            m_ref[h] = jnp.broadcast_to(m_next, (R, 128))
            l_ref[h] = jnp.broadcast_to(l_next, (R, 128))

    def consume(s, step, slot, state):
        wait_fetch(s, step, slot)
        compute(s, step, slot)
        return state

    double_buffered_seq_loop(s_begin, s_end, seq_steps, start_fetch, consume, jnp.int32(0))

    for h in range(nKV):
        l = jnp.max(l_ref[h], axis=1, keepdims=True)
        # Padding rows (and rows of q_len-0 tiles) never saw a key: l == 0 -> output 0.
        inv = jnp.where(l > 0, 1.0 / jnp.where(l > 0, l, 1.0), 0.0)
        o_ref[h] = (acc_ref[h] * inv).astype(o_ref.dtype)


def default_block_sizes(T, group, block_size, dtype, batch_invariant=False):
    """(num_queries_per_block, num_kv_blocks_per_step) defaults."""
    # The q block's second-minor dim (Tq * group) must be a multiple of the sublane tiling.
    align = 16 // math.gcd(16, group)
    if batch_invariant:
        # Fixed by the model alone (never by T). Small: a decode tile has one live token, so
        # the other rows are work thrown away.
        tq = round_up(max(1, _INVARIANT_ROWS // group), align)
        return tq, max(1, _TARGET_STEP_TOKENS // block_size)
    tq = max(align, round_up(max(1, _TARGET_ROWS // group), align))
    tq = min(tq, round_up(max(T, 1), align))
    nb = max(1, _TARGET_STEP_TOKENS // block_size)
    return tq, nb


@functools.partial(jax.jit, static_argnames=(
    "sm_scale", "sliding_window", "soft_cap", "interpret", "num_queries_per_block",
    "num_kv_blocks_per_step", "vmem_limit_bytes", "batch_invariant"))
def ragged_paged_attention(q, k_cache, v_cache, kv_lens, block_tables, cu_q_lens, *, sm_scale,
                           sliding_window=None, soft_cap=None, interpret=False,
                           num_queries_per_block=None, num_kv_blocks_per_step=None,
                           vmem_limit_bytes=None, batch_invariant=False):
    """TPU ragged paged attention; same contract as jaxllm.attention.reference.

    Args:
      q: [T, nH, D]; k_cache, v_cache: [num_blocks, block_size, nKV, D] (stay in HBM);
      kv_lens: [S] int32; block_tables: [S, max_blocks] int32; cu_q_lens: [S+1] int32.
      sm_scale, sliding_window, soft_cap: as in the reference.
      interpret: run the Pallas TPU interpreter (CPU, correctness only).
      num_queries_per_block: tokens per tile (Tq * group must be a multiple of 16).
      num_kv_blocks_per_step: KV blocks per DMA/compute step.
      batch_invariant: tiles aligned to absolute positions (module docstring): a token's output
        is bitwise independent of the rest of the step and of how its sequence was chunked.
    Returns: [T, nH, D] in q.dtype; padding tokens are zero.
    """
    T, nH, D, _, bs, nKV, S, max_blocks = validate_inputs(
        q, k_cache, v_cache, kv_lens, block_tables, cu_q_lens, sm_scale=sm_scale,
        sliding_window=sliding_window, soft_cap=soft_cap)
    if jnp.dtype(k_cache.dtype).itemsize == 2 and nKV > 1 and nKV % 2:
        raise ValueError(f"16-bit KV cache ({k_cache.dtype}) with an odd num_kv_heads={nKV} > 1 is "
                         "not supported by the TPU kernel (packed-row strided loads)")
    if jnp.dtype(k_cache.dtype).itemsize not in (2, 4):
        raise ValueError(f"KV cache dtype {k_cache.dtype} not supported (16- or 32-bit only)")
    group = nH // nKV
    tq, nb = default_block_sizes(T, group, bs, q.dtype, batch_invariant)
    if num_queries_per_block is not None:
        tq = num_queries_per_block
    if num_kv_blocks_per_step is not None:
        nb = num_kv_blocks_per_step
    if (tq * group) % 8:
        raise ValueError(f"num_queries_per_block={tq} * group={group} must be a multiple of 8")
    if nb <= 0:
        raise ValueError(f"num_kv_blocks_per_step={nb} must be positive")
    rows, num_tiles, q_bounds, tile_seqs = query_layout(T, kv_lens, cu_q_lens, tq, batch_invariant)
    Tp = num_tiles * tq
    R = tq * group

    # [T, nH, D] -> [nKV, Tp * group, D]: one XLA transpose of q (small next to the KV stream).
    qt = to_tiles(q, rows, num_tiles, tq, nKV)
    prefetch = (kv_lens, block_tables.reshape(-1), q_bounds, tile_seqs)
    q_spec = pl.BlockSpec((nKV, R, D), lambda i, *_: (0, i, 0))
    kernel = functools.partial(_kernel, sm_scale=float(sm_scale), sliding_window=sliding_window,
                               soft_cap=soft_cap, group=group, max_blocks=max_blocks)
    out = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=len(prefetch),
            grid=(num_tiles,),
            in_specs=[q_spec, pl.BlockSpec(memory_space=pl.ANY),
                      pl.BlockSpec(memory_space=pl.ANY)],
            out_specs=q_spec,
            scratch_shapes=[
                pltpu.VMEM((2, nb, bs, nKV, D), k_cache.dtype),
                pltpu.VMEM((2, nb, bs, nKV, D), v_cache.dtype),
                pltpu.SemaphoreType.DMA((2, 2)),
                pltpu.VMEM((nKV, R, 128), jnp.float32),
                pltpu.VMEM((nKV, R, 128), jnp.float32),
                pltpu.VMEM((nKV, R, D), jnp.float32),
            ],
        ),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",),
                                             vmem_limit_bytes=vmem_limit_bytes),
        out_shape=jax.ShapeDtypeStruct((nKV, Tp * group, D), q.dtype),
        interpret=interpret,
        name="jaxllm_ragged_paged_attention_tpu",
    )(*prefetch, qt, k_cache, v_cache)
    return from_tiles(out, rows, T, nH)
