"""Batch-invariant paged attention (EngineConfig.batch_invariant): a token's output is bitwise the
same whatever else is in the step, however its sequence was chunked, and whether its keys were
computed now, earlier, before a preemption or by another request (prefix cache).

The reference attention picks tile and chunk widths from the batch (T, each tile's KV range) and
sends a token down a shared-KV or a per-token path by its sequence's query count; each choice
changes the float rounding. Here nothing depends on the batch:

* Query tiles are aligned to absolute positions: tile j of a sequence holds its positions
  [j * TILE, (j + 1) * TILE), so a token always sits in the same row of the same-shaped matmul
  (rows of other steps' positions are computed and dropped). Decodes are tiles with one live row.
* KV chunks are CHUNK keys wide and start at a multiple of CHUNK fixed by the tile index (0, or
  the sliding window's reach), so every token folds the same chunks into its online softmax in
  the same order. A tile runs as many chunks as its last row needs; for the other rows the extra
  chunks are fully masked, which leaves m, l and acc exactly unchanged (alpha = exp(0) = 1, p = 0).
* The step's own K/V are written to the cache before this reads them (make_paged_attention), so a
  key is read from the cache the same way whether it was computed in this step or an earlier one.

Same signature and contract as attention.reference.ragged_paged_attention.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from jaxllm.attention.reference import _MASK, _softcap

TILE = 16  # query positions per tile
CHUNK = 128  # KV tokens per online-softmax step (rounded to whole blocks)


@functools.partial(jax.jit, static_argnames=("sm_scale", "sliding_window", "soft_cap"))
def ragged_paged_attention(q, k_cache, v_cache, kv_lens, block_tables, cu_q_lens, *, sm_scale,
                           sliding_window=None, soft_cap=None):
    """q [T, nH, D]; k_cache, v_cache [num_blocks, block_size, nKV, D] (this step's K/V written);
    kv_lens [S], block_tables [S, max_blocks], cu_q_lens [S + 1] int32 -> [T, nH, D] in q.dtype
    (zeros for padding tokens). See reference.ragged_paged_attention for the conventions."""
    T, nH, D = q.shape
    _, bs, nKV, _ = k_cache.shape
    if nH % nKV:
        raise ValueError(f"num_heads={nH} is not a multiple of num_kv_heads={nKV}")
    g = nH // nKV
    S, max_blocks = block_tables.shape
    nb = max(1, CHUNK // bs)  # blocks per chunk
    cw = nb * bs  # keys per chunk

    q_lens = cu_q_lens[1:] - cu_q_lens[:-1]  # [S]
    first_pos = kv_lens - q_lens  # position of each sequence's first query token
    j_lo = first_pos // TILE
    tiles_per_seq = jnp.where(q_lens > 0, -(-kv_lens // TILE) - j_lo, 0)
    cu_tiles = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(tiles_per_seq).astype(jnp.int32)])

    # TILE spare rows on both sides: a tile may start up to TILE - 1 rows before its sequence's
    # first token, or end past the last one; dynamic slices must never be clamped (shifted).
    pad = ((TILE, TILE), (0, 0), (0, 0), (0, 0))
    qf = jnp.pad(q.reshape(T, nKV, g, D).astype(jnp.float32), pad)
    out = jnp.zeros((T + 2 * TILE, nKV, g, D), jnp.float32)
    kv_offsets = jnp.arange(cw, dtype=jnp.int32)

    def tile(i, out):
        s = jnp.searchsorted(cu_tiles[1:], i, side="right").astype(jnp.int32)
        j = j_lo[s] + i - cu_tiles[s]
        pos = j * TILE + jnp.arange(TILE, dtype=jnp.int32)  # [TILE] absolute positions
        live = (pos >= first_pos[s]) & (pos < kv_lens[s])  # computed in this step
        hi = jnp.where(live, pos + 1, 0)
        lo = jnp.zeros_like(hi) if sliding_window is None else jnp.clip(pos - sliding_window + 1, 0, hi)
        # The tile's first chunk: fixed by j alone (the window's reach of its first row).
        reach = 0 if sliding_window is None else jnp.maximum(j * TILE - sliding_window + 1, 0)
        c0 = reach // cw
        n_chunks = -(-hi.max() // cw) - c0
        start = TILE + cu_q_lens[s] + j * TILE - first_pos[s]  # row of pos[0] in qf / out
        qt = jnp.swapaxes(lax.dynamic_slice_in_dim(qf, start, TILE), 0, 1)  # [nKV, TILE, g, D]
        table = block_tables[s]

        def chunk(c, carry):
            m, l, acc = carry
            kv_pos = (c0 + c) * cw + kv_offsets  # [C]
            ids = jnp.take(table, jnp.clip(kv_pos[::bs] // bs, 0, max_blocks - 1))
            ids = jnp.clip(ids, 0, k_cache.shape[0] - 1)

            def load(cache):  # [nKV, C, D] f32
                return jnp.swapaxes(cache[ids].reshape(cw, nKV, D).astype(jnp.float32), 0, 1)

            mask = (kv_pos[None, :] >= lo[:, None]) & (kv_pos[None, :] < hi[:, None])  # [TILE, C]
            v = jnp.where((kv_pos < hi.max())[None, :, None], load(v_cache), 0.0)  # 0 * NaN = NaN
            sc = _softcap(jnp.einsum("ktgd,kcd->ktgc", qt, load(k_cache)) * sm_scale, soft_cap)
            sc = jnp.where(mask[None, :, None, :], sc, _MASK)
            m_new = jnp.maximum(m, sc.max(axis=-1))
            p = jnp.where(mask[None, :, None, :], jnp.exp(sc - m_new[..., None]), 0.0)
            alpha = jnp.exp(m - m_new)
            pv = jnp.einsum("ktgc,kcd->ktgd", p, v)
            return m_new, alpha * l + p.sum(axis=-1), alpha[..., None] * acc + pv

        init = (jnp.full(qt.shape[:3], _MASK, jnp.float32), jnp.zeros(qt.shape[:3], jnp.float32),
                jnp.zeros(qt.shape, jnp.float32))
        _, l, acc = lax.fori_loop(0, n_chunks, chunk, init)
        o = jnp.swapaxes(jnp.where(l[..., None] > 0, acc / jnp.where(l > 0, l, 1.0)[..., None], 0.0), 0, 1)
        old = lax.dynamic_slice_in_dim(out, start, TILE)
        return lax.dynamic_update_slice_in_dim(out, jnp.where(live[:, None, None, None], o, old), start, axis=0)

    out = lax.fori_loop(0, cu_tiles[S], tile, out)
    return out[TILE : TILE + T].reshape(T, nH, D).astype(q.dtype)
