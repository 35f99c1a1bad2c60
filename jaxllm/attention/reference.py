"""Paged attention and KV-cache write in plain jnp: the specification every kernel is tested against.

It is also the attention the engine runs on CPU, so it is written to be cheap there rather than
obviously correct (the tests compare it with a dense per-sequence numpy computation). The aim is a
cost proportional to the K/V each token really needs (sum of kv lengths), not to T x longest:

* Every valid token needs the keys at positions [lo, hi): hi = pos + 1 (causal), lo = 0 or, with a
  sliding window, pos - window + 1. Both loops below walk whole blocks over [lo, hi) only, with
  dynamic trip counts, and run an f32 online softmax over chunks of a few blocks.
* Sequences with at least _SHARED_MIN_Q_LEN query tokens (prefill chunks) are cut into
  sequence-aligned tiles of `q_tile` tokens: a tile never straddles two sequences, so each KV chunk
  is gathered once and shared by the tile's queries (a matmul). The chunk width is picked per tile
  among _SEQ_CHUNK_TOKENS from the tile's KV range, so a 70-token prompt is not scored against
  512-token chunks and a 2k context does not pay for many tiny loop steps.
* The other tokens (decodes, short chunks) each need their own KV: they are sorted by the number of
  blocks they need and processed in tiles of _TOKEN_TILE tokens, each gathering its own blocks.
  Sorting makes a tile's tokens need about as much KV as each other, so the tile's loop (as long as
  its longest token) wastes little; results are scattered back to the tokens' original rows.
* Gathered chunks are put head-major before the products (V [..., nKV, C, D], K [..., nKV, D, C]):
  XLA:CPU's batched dots are much faster on that layout than on the cache's [C, nKV, D], and with
  K's positions minor, scores contract a major axis (a vectorised loop over positions). Chunks stay a few MB (cache
  sized); nothing of size [T, max_kv_len, nKV, D] is ever materialised.
* Positions past a sequence's kv_len may hold anything (NaN in tests, stale data in the engine):
  scores are masked with `where` (not additive masks) and V is zeroed there too, since 0 * NaN = NaN.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.ragged_paged_attention import common as _common

# Finite "minus infinity": a fully masked row then has m = _MASK, exp(s - m) stays finite and the
# `where` on p zeroes it, instead of producing (-inf) - (-inf) = NaN.
_MASK = -1e30

# Sequences with at least this many query tokens get shared-KV tiles; shorter ones go per token
# (a 32-row tile for 1-7 queries wastes more matmul work than gathering their KV per token).
_SHARED_MIN_Q_LEN = 8
# Shared-KV tiles: candidate KV chunk widths (tokens), smallest first. A tile uses the smallest
# width w with range <= _CHUNKS_PER_WIDTH * w (or the largest), i.e. at most a few loop steps.
_SEQ_CHUNK_TOKENS = (32, 128, 512)
_CHUNKS_PER_WIDTH = 4
# Per-token tiles: tokens per tile and KV tokens per chunk. [8, 64, nKV, D] f32 is 1.5 MB for the
# 138M model: gathered chunks that stay in cache are several times faster to score than big ones.
_TOKEN_TILE = 8
_TOKEN_CHUNK_TOKENS = 64


# The KV write is one jnp scatter for every backend (its reasons are in pallas_kernels' README:
# in place when the step donates the cache, and it moves only T * nKV * D elements), so the
# reference uses the kernel family's function rather than a copy of it.
write_kv = _common.write_kv


def token_metadata(kv_lens, cu_q_lens, num_tokens):
    """Per-token sequence index, absolute position and validity.

    Args:
      kv_lens: [S] int32; cu_q_lens: [S+1] int32; num_tokens: T (static).
    Returns:
      seq [T] int32 (clipped into [0, S-1]), pos [T] int32, valid [T] bool (False for padding).
    """
    num_seqs = kv_lens.shape[0]
    t = jnp.arange(num_tokens, dtype=jnp.int32)
    # seq of token t = number of sequences that end at or before t.
    seq = jnp.searchsorted(cu_q_lens[1:], t, side="right").astype(jnp.int32)
    seq = jnp.minimum(seq, num_seqs - 1)
    valid = t < cu_q_lens[num_seqs]
    q_start = cu_q_lens[seq]
    q_len = cu_q_lens[seq + 1] - q_start
    pos = kv_lens[seq] - q_len + (t - q_start)
    return seq, pos, valid


def _softcap(s, soft_cap):
    if soft_cap is None:
        return s
    return soft_cap * jnp.tanh(s / soft_cap)


@functools.partial(jax.jit, static_argnames=("sm_scale", "sliding_window", "soft_cap", "q_tile"))
def ragged_paged_attention(q, k_cache, v_cache, kv_lens, block_tables, cu_q_lens, *, sm_scale,
                           sliding_window=None, soft_cap=None, q_tile=32):
    """Causal attention of a ragged batch of query tokens over a paged KV cache.

    Args:
      q: [T, nH, D] queries (RoPE applied). Token i of sequence s (i < q_len_s) sits at position
        kv_lens[s] - q_len_s + i; tokens at index >= cu_q_lens[S] are padding.
      k_cache, v_cache: [num_blocks, block_size, nKV, D]; this step's K/V already written.
      kv_lens: [S] int32, tokens in the cache per sequence (this step's included).
      block_tables: [S, max_blocks_per_seq] int32 physical block ids; entries past a sequence's
        kv_len may be anything in range or not (they are clipped, and their data masked).
      cu_q_lens: [S+1] int32 prefix sums of query lengths.
      sm_scale: score scale (usually D**-0.5). sliding_window: keys at positions > pos - window
        only. soft_cap: scores -> soft_cap * tanh(scores / soft_cap) (after sm_scale).
      q_tile: tokens per shared-KV tile, and at most the per-token tile size (static tuning knob;
        results do not depend on it).
    Returns:
      [T, nH, D] in q.dtype; padding tokens get zeros.
    """
    T, nH, D = q.shape
    _, bs, nKV, _ = k_cache.shape
    if nH % nKV:
        raise ValueError(f"num_heads={nH} is not a multiple of num_kv_heads={nKV}")
    g = nH // nKV
    S, max_blocks = block_tables.shape
    num_cache_blocks = k_cache.shape[0]
    tq = max(1, min(q_tile, T))  # shared-KV tile
    td = max(1, min(q_tile, _TOKEN_TILE, T))  # per-token tile

    seq, pos, valid = token_metadata(kv_lens, cu_q_lens, T)
    q_lens = cu_q_lens[1:] - cu_q_lens[:-1]  # [S]

    def kv_range(tpos, tvalid, kv_len):
        # [lo, hi) key positions a token attends to; empty (0, 0) for padding.
        hi = jnp.where(tvalid, jnp.minimum(tpos + 1, kv_len), 0)
        if sliding_window is None:
            return jnp.zeros_like(hi), hi
        return jnp.clip(tpos - sliding_window + 1, 0, hi), hi

    # `tq` spare rows at the end: a tile's dynamic_slice never runs off the end (it would be
    # clamped, i.e. shifted), and row T is where per-token padding rows write their garbage.
    qf = jnp.pad(q.reshape(T, nKV, g, D).astype(jnp.float32), ((0, tq), (0, 0), (0, 0), (0, 0)))
    out = jnp.zeros((T + tq, nKV, g, D), jnp.float32)

    def attend(qt, table, b0, n_chunks, chunk_blocks, lo, hi):
        """Online softmax of a tile's queries over n_chunks chunks of chunk_blocks blocks.

        qt [Tq, nKV, g, D] f32; lo, hi [Tq] key ranges. Either one shared block table (table
        [max_blocks], b0 scalar: K/V gathered once for the tile) or one per token (table
        [Tq, max_blocks], b0 [Tq]). Chunk c covers blocks b0 + c * chunk_blocks + [0, chunk_blocks).
        Returns the normalised output [Tq, nKV, g, D] (zeros for rows that see no key).
        """
        shared = table.ndim == 1
        ct = chunk_blocks * bs
        if shared:
            # Head-major queries [nKV, Tq, g, D]: both einsums become plain batched matmuls (no
            # per-step transposes), worth ~2x on the P.V product on XLA:CPU.
            qt = jnp.swapaxes(qt, 0, 1)

        def body(c, carry):
            m, l, acc = carry
            j = b0[..., None] + c * chunk_blocks + jnp.arange(chunk_blocks, dtype=jnp.int32)
            # Clipped so stale table entries and the ragged last chunk stay in bounds; whatever
            # they point at is masked below.
            ids = jnp.take_along_axis(table, jnp.clip(j, 0, max_blocks - 1), axis=-1)
            ids = jnp.clip(ids, 0, num_cache_blocks - 1)
            kv_pos = (j[..., None] * bs + jnp.arange(bs, dtype=jnp.int32)).reshape(*j.shape[:-1], ct)

            def load(cache):  # -> [(Tq,) nKV, C, D] f32, head-major
                # Not a gather of rows of a [num_blocks, bs * nKV * D] view (faster alone on
                # XLA:CPU): under pipeline / tensor parallelism the head axis is sharded, and
                # merging it into a row made XLA copy the whole cache each step.
                x = cache[ids].reshape(*ids.shape[:-1], ct, nKV, D).astype(jnp.float32)
                return jnp.swapaxes(x, -3, -2)

            # K as [(Tq,) nKV, D, C]: the score contraction then runs over a major axis with the
            # keys along the vectorised minor one. XLA:CPU's dot over a contracted minor axis on
            # both sides (q . k^T over D) was the slowest op of a decode step (see below).
            k, v = jnp.swapaxes(load(k_cache), -1, -2), load(v_cache)
            pos_row = kv_pos[None, :] if shared else kv_pos  # [1 or Tq, C]
            mask = (pos_row >= lo[:, None]) & (pos_row < hi[:, None])  # [Tq, C]
            # V rows past every query's hi may be unwritten (NaN): zero them, as p * NaN = NaN. K
            # needs no such care: its NaN scores are replaced by the `where` below.
            v_ok = (kv_pos < hi.max()) if shared else (kv_pos < hi[:, None])
            v = jnp.where(v_ok[..., None, :, None], v, 0.0)
            if shared:
                s = jnp.einsum("ktgd,kdc->ktgc", qt, k)
            else:
                # A multiply and a sum over D, not an einsum: with one query row per token the dot
                # is [g, D] x [D, C] per (token, head), too small for XLA:CPU's matmul, while the
                # fused loop vectorises over C: 1.2-1.5x less time for a 32-token decode tile loop
                # (experiments/bench_attention.py --num-kv-heads 3 --head-dim 64 --group 3).
                s = (qt[..., None] * k[:, :, None, :, :]).sum(-2)
            s = _softcap(s * sm_scale, soft_cap)
            mask = mask[None, :, None, :] if shared else mask[:, None, None, :]
            s = jnp.where(mask, s, _MASK)
            m_new = jnp.maximum(m, s.max(axis=-1))
            p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
            alpha = jnp.exp(m - m_new)
            pv = jnp.einsum("ktgc,kcd->ktgd" if shared else "tkgc,tkcd->tkgd", p, v)
            return m_new, alpha * l + p.sum(axis=-1), alpha[..., None] * acc + pv

        init = (jnp.full(qt.shape[:3], _MASK, jnp.float32), jnp.zeros(qt.shape[:3], jnp.float32),
                jnp.zeros(qt.shape, jnp.float32))
        _, l, acc = lax.fori_loop(0, n_chunks, body, init)
        o = jnp.where(l[..., None] > 0, acc / jnp.where(l > 0, l, 1.0)[..., None], 0.0)
        return jnp.swapaxes(o, 0, 1) if shared else o

    # ---- 1. Shared-KV tiles: ceil(q_len / tq) tiles per long-enough sequence, in order.
    shared_seq = q_lens >= _SHARED_MIN_Q_LEN  # [S]
    tiles_per_seq = jnp.where(shared_seq, -(-q_lens // tq), 0)
    cu_tiles = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(tiles_per_seq).astype(jnp.int32)])

    def shared_tile(i, out):
        s = jnp.searchsorted(cu_tiles[1:], i, side="right").astype(jnp.int32)
        first = (i - cu_tiles[s]) * tq  # index of the tile's first token within its sequence
        start = cu_q_lens[s] + first
        rows = first + jnp.arange(tq, dtype=jnp.int32)
        tvalid = rows < q_lens[s]
        lo, hi = kv_range(kv_lens[s] - q_lens[s] + rows, tvalid, kv_lens[s])
        b0 = jnp.min(jnp.where(tvalid, lo, 2**30)) // bs
        need = -(-hi.max() // bs) - b0  # blocks the tile needs
        qt = lax.dynamic_slice_in_dim(qf, start, tq)

        def with_width(w):
            nb = max(1, w // bs)
            return lambda: attend(qt, block_tables[s], b0, -(-need // nb), nb, lo, hi)

        widths = _SEQ_CHUNK_TOKENS
        which = sum((need * bs > _CHUNKS_PER_WIDTH * w).astype(jnp.int32) for w in widths[:-1])
        o = lax.switch(which, [with_width(w) for w in widths])
        # Rows past the sequence's end belong to the next sequence (or padding): keep them.
        old = lax.dynamic_slice_in_dim(out, start, tq)
        return lax.dynamic_update_slice_in_dim(out, jnp.where(tvalid[:, None, None, None], o, old),
                                               start, axis=0)

    out = lax.fori_loop(0, cu_tiles[S], shared_tile, out)

    # ---- 2. Per-token tiles for everything else, sorted by blocks needed.
    lo, hi = kv_range(pos, valid, kv_lens[seq])
    per_token = valid & ~shared_seq[seq]
    need = jnp.where(per_token, -(-hi // bs) - lo // bs, 0)
    order = jnp.argsort(jnp.where(per_token, need, 2**30)).astype(jnp.int32)  # per-token ones first
    num_per_token = per_token.sum()
    # Sorted rank -> token; ranks past the per-token tokens point at the spare row T.
    order = jnp.pad(order, (0, td), constant_values=T)

    def token_tile(i, out):
        r = i * td + jnp.arange(td, dtype=jnp.int32)
        idx = jnp.where(r < num_per_token, order[r], T)
        tvalid = idx < T
        t = jnp.minimum(idx, T - 1)
        tlo, thi = jnp.where(tvalid, lo[t], 0), jnp.where(tvalid, hi[t], 0)
        b0 = tlo // bs
        nb = max(1, _TOKEN_CHUNK_TOKENS // bs)
        n_chunks = -(-jnp.max(-(-thi // bs) - b0) // nb)
        o = attend(qf[idx], block_tables[seq[t]], b0, n_chunks, nb, tlo, thi)
        return out.at[idx].set(o)  # un-permute; padding rows all land on row T

    out = lax.fori_loop(0, -(-num_per_token // td), token_tile, out)
    return out[:T].reshape(T, nH, D).astype(q.dtype)


def dense_reference(q, k_cache, v_cache, kv_lens, block_tables, cu_q_lens, *, sm_scale,
                    sliding_window=None, soft_cap=None):
    """Obvious numpy float64 implementation, one sequence at a time (tests only; [T, nH, D])."""
    import numpy as np

    q = np.asarray(q, np.float64)
    kc = np.asarray(k_cache, np.float64)
    vc = np.asarray(v_cache, np.float64)
    kv_lens = np.asarray(kv_lens)
    block_tables = np.asarray(block_tables)
    cu = np.asarray(cu_q_lens)
    T, nH, D = q.shape
    _, bs, nKV, _ = kc.shape
    g = nH // nKV
    out = np.zeros((T, nH, D))
    for s in range(len(kv_lens)):
        q_len = cu[s + 1] - cu[s]
        kv_len = kv_lens[s]
        if q_len == 0:
            continue
        nb = math.ceil(kv_len / bs)
        k = kc[block_tables[s, :nb]].reshape(-1, nKV, D)[:kv_len]
        v = vc[block_tables[s, :nb]].reshape(-1, nKV, D)[:kv_len]
        k = np.repeat(k, g, axis=1)
        v = np.repeat(v, g, axis=1)
        qs = q[cu[s]:cu[s + 1]]
        sc = np.einsum("qhd,khd->hqk", qs, k) * sm_scale
        if soft_cap is not None:
            sc = soft_cap * np.tanh(sc / soft_cap)
        qpos = kv_len - q_len + np.arange(q_len)
        kpos = np.arange(kv_len)
        mask = kpos[None, :] <= qpos[:, None]
        if sliding_window is not None:
            mask &= kpos[None, :] > qpos[:, None] - sliding_window
        sc = np.where(mask[None], sc, -np.inf)
        sc = sc - sc.max(-1, keepdims=True)
        p = np.exp(sc)
        p /= p.sum(-1, keepdims=True)
        out[cu[s]:cu[s + 1]] = np.einsum("hqk,khd->qhd", p, v)
    return out
