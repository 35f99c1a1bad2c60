"""Ragged paged attention for NVIDIA Hopper+ GPUs (Pallas / Mosaic GPU, `plgpu`).

Not the deprecated Pallas Triton backend: this is a Mosaic GPU kernel (TMA copies, mbarriers,
WGMMA), lowering to a `mosaic_gpu` custom call.

Grid: (token tiles, KV heads); one warpgroup (128 threads) per CTA. As in the TPU kernel the
wrapper lays q out as [nKV, T * group, D] so a CTA's queries are one dense [R = Tq * group, D]
tile (R a multiple of 64, WGMMA's M granularity) and GQA costs nothing extra: the group's q heads
are rows of the same matmul against one K/V stream.

Per CTA: for each sequence with tokens in the tile, for each step of `num_kv_blocks_per_step` KV
blocks the tile can see, every K and V page of the step is fetched by its own TMA copy
(`k_cache.at[block_id, :, head, :]`, a strided [block_size, D] box; the block id is a scalar read
from the block table in GMEM) into a double-buffered, 128B-swizzled SMEM slot. Pages past kv_len
are not copied; their barrier arrival is made by hand so each slot's barrier always expects exactly
`num_kv_blocks_per_step` arrivals. The copies of step i+1 are issued before step i computes.
Compute: S = Q K^T (WGMMA, f32 accumulator), masks and online softmax in registers, O += P V
(WGMMA with P as a register operand). On the last step of a sequence the rows of V past kv_len are
zeroed in SMEM first: they are stale or NaN and 0 * NaN = NaN.

Limitations (see README): 16-bit dtypes only (f32 would need tf32 WGMMA; the adapter falls back to
the reference for f32 on GPU); head_dim a multiple of 64; KV tokens per step a multiple of 64;
block_size a multiple of 8 (TMA box rows land on whole 8-row swizzle tiles). No warp
specialisation yet: one warpgroup issues the TMAs and computes, so the overlap is plain
double-buffering rather than FA3-style producer/consumer pipelining.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from .common import (MASK_VALUE, double_buffered_seq_loop, from_tiles, kv_step_range,
                     query_layout, to_tiles, validate_inputs)

_ROWS = 64  # WGMMA M granularity: rows (tokens * group) per CTA
_TARGET_STEP_TOKENS = 128


def default_block_sizes(T, group, block_size):
    """(num_queries_per_block, num_kv_blocks_per_step) defaults."""
    tq = max(1, _ROWS // group) if _ROWS % group == 0 else _ROWS
    tq = max(tq, 1)
    nb = max(1, _TARGET_STEP_TOKENS // block_size)
    while (nb * block_size) % 64:
        nb += 1
    return tq, nb


def _kernel(kv_lens_ref, block_tables_ref, q_bounds_ref, tile_seqs_ref, q_ref, k_ref, v_ref,
            o_ref, q_smem, k_smem, v_smem, q_bar, k_bars, v_bars, *, sm_scale, sliding_window,
            soft_cap, group, max_blocks, nb, bs, use_layouts):
    """Refs: scalars/q/k/v/o in GMEM; q_smem [R, D]; k_smem, v_smem [2, C, D]; barriers."""
    R, D = q_smem.shape
    C = nb * bs
    Tq = R // group
    tile = lax.axis_index("tile")
    h = lax.axis_index("head")
    tile_start = tile * Tq
    tile_end = tile_start + Tq
    s_begin = tile_seqs_ref[2 * tile]
    s_end = tile_seqs_ref[2 * tile + 1]
    dtype = q_smem.dtype
    layout = plgpu.Layout.WGMMA

    # Register layouts only mean something to the Mosaic GPU compiler; its CPU interpreter has no
    # lowering for layout_cast, so interpret mode traces the same kernel without them.
    def cast(x, lay):
        return plgpu.layout_cast(x, lay) if use_layouts else x

    def iota(shape, dim):
        return cast(lax.broadcasted_iota(jnp.int32, shape, dim), layout)

    plgpu.copy_gmem_to_smem(q_ref.at[h, pl.ds(tile * R, R)], q_smem, q_bar)

    def seq_steps(s):
        """(first step, end step) of KV steps sequence s needs for this tile's tokens."""
        return kv_step_range(q_bounds_ref[2 * s], q_bounds_ref[2 * s + 1], kv_lens_ref[s], tile_start,
                             tile_end, C, sliding_window)

    def start_fetch(s, step, slot):
        n_pages = lax.div(kv_lens_ref[s] + bs - 1, jnp.int32(bs))
        for j in range(nb):
            p = step * nb + j
            dst = pl.ds(j * bs, bs)

            @pl.when(p < n_pages)
            def _():
                blk = block_tables_ref[s * max_blocks + p]
                plgpu.copy_gmem_to_smem(k_ref.at[blk, :, h, :], k_smem.at[slot, dst], k_bars.at[slot])
                plgpu.copy_gmem_to_smem(v_ref.at[blk, :, h, :], v_smem.at[slot, dst], v_bars.at[slot])

            # Pages past kv_len are never read from HBM; arrive anyway so the slot's barrier
            # completes its phase after exactly nb arrivals.
            @pl.when(p >= n_pages)
            def _():
                plgpu.barrier_arrive(k_bars.at[slot])
                plgpu.barrier_arrive(v_bars.at[slot])

    def compute(s, step, slot, carry):
        acc, m_i, l_i = carry
        q_start = q_bounds_ref[2 * s]
        q_end = q_bounds_ref[2 * s + 1]
        kv_len = kv_lens_ref[s]
        ctx = kv_len - (q_end - q_start) - q_start
        kv_start = step * C

        plgpu.barrier_wait(k_bars.at[slot])

        def qk_scope(acc_ref):
            plgpu.wgmma(acc_ref, q_smem, plgpu.transpose_ref(k_smem.at[slot], (1, 0)))
            return acc_ref[...]

        if use_layouts:
            sc = pl.run_scoped(qk_scope, plgpu.ACC((R, C), jnp.float32))
        else:
            # The Mosaic GPU interpreter cannot apply transpose_ref to a WGMMA operand yet; compute
            # the same product from SMEM with a plain dot (only this matmul differs when
            # interpreting, see also P @ V below).
            sc = lax.dot_general(q_smem[...], k_smem[slot], (((1,), (1,)), ((), ())),
                                 preferred_element_type=jnp.float32)
        sc = sc * sm_scale
        if soft_cap is not None:
            sc = soft_cap * jnp.tanh(sc / soft_cap)
        row = iota((R, C), 0)
        col = kv_start + iota((R, C), 1)
        tok = tile_start + lax.div(row, jnp.int32(group))
        pos = ctx + tok
        mask = (tok >= q_start) & (tok < q_end) & (col <= pos) & (col < kv_len)
        if sliding_window is not None:
            mask = mask & (col > pos - sliding_window)
        sc = jnp.where(mask, sc, MASK_VALUE)
        m_new = jnp.maximum(m_i, sc.max(axis=1))
        p = jnp.where(mask, jnp.exp(sc - lax.broadcast_in_dim(m_new, sc.shape, [0])), 0.0)
        alpha = jnp.exp(m_i - m_new)
        l_i = l_i * alpha + p.sum(axis=1)
        acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])

        plgpu.barrier_wait(v_bars.at[slot])

        @pl.when(kv_start + C > kv_len)
        def _():
            # Tail step: zero V rows past kv_len (stale or NaN SMEM) before P @ V.
            v = v_smem[slot]
            vrow = kv_start + iota((C, D), 0)
            v_smem[slot] = jnp.where(vrow < kv_len, v, jnp.zeros_like(v))
            plgpu.commit_smem()

        def pv_scope(acc_ref):
            plgpu.wgmma(acc_ref, p.astype(dtype), v_smem.at[slot])
            return acc_ref[...]

        # A fresh zero accumulator (not ACC.init(acc) + run_state) costs one [R, D] register add
        # per step but keeps the kernel runnable under the Mosaic GPU interpreter.
        if use_layouts:
            acc = acc + pl.run_scoped(pv_scope, plgpu.ACC((R, D), jnp.float32))
        else:  # interpreter: no WGMMA with a register operand yet
            acc = acc + lax.dot_general(p.astype(dtype), v_smem[slot], (((1,), (0,)), ((), ())),
                                        preferred_element_type=jnp.float32)
        return acc, m_new, l_i

    m0 = cast(jnp.full((R,), MASK_VALUE, jnp.float32), layout.reduce(1))
    l0 = cast(jnp.full((R,), 0.0, jnp.float32), layout.reduce(1))
    acc0 = cast(jnp.full((R, D), 0.0, jnp.float32), layout)
    plgpu.barrier_wait(q_bar)
    acc, _, l_i = double_buffered_seq_loop(s_begin, s_end, seq_steps, start_fetch, compute,
                                           (acc0, m0, l0))

    # Rows that saw no key (padding tokens) have l == 0: output 0, not 0/0.
    inv = jnp.where(l_i > 0, 1.0 / jnp.where(l_i > 0, l_i, 1.0), 0.0)
    out = acc * lax.broadcast_in_dim(inv, acc.shape, [0])
    q_smem[...] = out.astype(dtype)  # q is no longer needed: reuse its SMEM for the output
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(q_smem, o_ref.at[h, pl.ds(tile * R, R)])
    plgpu.wait_smem_to_gmem(0)


@functools.partial(jax.jit, static_argnames=(
    "sm_scale", "sliding_window", "soft_cap", "interpret", "num_queries_per_block",
    "num_kv_blocks_per_step", "batch_invariant"))
def ragged_paged_attention(q, k_cache, v_cache, kv_lens, block_tables, cu_q_lens, *, sm_scale,
                           sliding_window=None, soft_cap=None, interpret=False,
                           num_queries_per_block=None, num_kv_blocks_per_step=None,
                           batch_invariant=False):
    """Mosaic GPU ragged paged attention; same contract as jaxllm.attention.reference.

    Args:
      q: [T, nH, D] bf16/f16; k_cache, v_cache: [num_blocks, block_size, nKV, D] same dtype;
      kv_lens: [S] int32; block_tables: [S, max_blocks] int32; cu_q_lens: [S+1] int32.
      interpret: run under the Mosaic GPU interpreter (CPU; correctness only, experimental).
      batch_invariant: tiles aligned to absolute positions per sequence, as in the TPU kernel
        (tpu.py docstring): a token's output is bitwise independent of its batch and chunking.
    Returns: [T, nH, D] in q.dtype; padding tokens are zero.
    """
    T, nH, D, _, bs, nKV, S, max_blocks = validate_inputs(
        q, k_cache, v_cache, kv_lens, block_tables, cu_q_lens, sm_scale=sm_scale,
        sliding_window=sliding_window, soft_cap=soft_cap)
    if q.dtype not in (jnp.bfloat16, jnp.float16) or k_cache.dtype != q.dtype:
        raise ValueError(f"GPU kernel needs q and cache in the same 16-bit dtype (WGMMA), got "
                         f"q.dtype={q.dtype}, k_cache.dtype={k_cache.dtype}")
    if D % 64:
        raise ValueError(f"GPU kernel needs head_dim % 64 == 0 (128B swizzle), got head_dim={D}")
    if bs % 8:
        raise ValueError(f"GPU kernel needs block_size % 8 == 0, got block_size={bs}")
    group = nH // nKV
    tq, nb = default_block_sizes(T, group, bs)
    if num_queries_per_block is not None:
        tq = num_queries_per_block
    if num_kv_blocks_per_step is not None:
        nb = num_kv_blocks_per_step
    R = tq * group
    if R % 64:
        raise ValueError(f"num_queries_per_block={tq} * group={group} must be a multiple of 64")
    C = nb * bs
    if C % 64:
        raise ValueError(f"num_kv_blocks_per_step={nb} * block_size={bs} must be a multiple of 64")
    # The default tile height does not depend on T, so batch_invariant only changes the layout.
    rows, num_tiles, q_bounds, tile_seqs = query_layout(T, kv_lens, cu_q_lens, tq, batch_invariant)
    Tp = num_tiles * tq
    qt = to_tiles(q, rows, num_tiles, tq, nKV)

    swizzle = 128
    elems = swizzle // jnp.dtype(q.dtype).itemsize
    transforms = (plgpu.TilingTransform((8, elems)), plgpu.SwizzleTransform(swizzle))
    kernel = functools.partial(_kernel, sm_scale=float(sm_scale), sliding_window=sliding_window,
                               soft_cap=soft_cap, group=group, max_blocks=max_blocks, nb=nb, bs=bs,
                               use_layouts=not interpret)
    out = plgpu.kernel(
        kernel,
        out_type=jax.ShapeDtypeStruct((nKV, Tp * group, D), q.dtype),
        grid=(num_tiles, nKV),
        grid_names=("tile", "head"),
        scratch_types=[
            plgpu.SMEM((R, D), q.dtype, transforms=transforms),
            plgpu.SMEM((2, C, D), q.dtype, transforms=transforms),
            plgpu.SMEM((2, C, D), q.dtype, transforms=transforms),
            plgpu.Barrier(num_arrivals=1),
            plgpu.Barrier(num_arrivals=nb, num_barriers=2),
            plgpu.Barrier(num_arrivals=nb, num_barriers=2),
        ],
        interpret=interpret,
        kernel_name="jaxllm_ragged_paged_attention_gpu",
    )(kv_lens, block_tables.reshape(-1), q_bounds, tile_seqs, qt, k_cache, v_cache)
    return from_tiles(out, rows, T, nH)
