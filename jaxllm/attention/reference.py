"""Paged attention and KV-cache write in plain jnp: the specification every kernel is tested against.

It is also the attention the engine runs on CPU, so it is written to be cheap there rather than
obviously correct (the tests compare it with a dense per-sequence numpy computation):

* Tokens are processed in tiles of `q_tile` consecutive tokens. Each tile runs an online-softmax
  (f32) loop over KV chunks of a few blocks, with a dynamic trip count that covers only the chunks
  some token of the tile can see (causal limit, kv_len, sliding window), so short batches and
  padding tiles cost (almost) nothing.
* A tile whose tokens all belong to one sequence (the body of a prefill chunk) gathers each KV
  chunk once and shares it across the tile's queries. A tile spanning several sequences (decode
  tokens, sequence boundaries) gathers K/V per token through block_tables[seq_of_token]; chunk
  sizes are chosen so that the per-token gather stays a few MB. Nothing of size
  [T, max_kv_len, nKV, D] is ever materialised.
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

# Budget (elements) for one per-token K or V gather [q_tile, chunk, nKV, D] in the multi-sequence
# path: 2M f32 elements = 8 MB, small enough for CPU caches-ish and to keep peak memory low.
_GATHER_BUDGET = 2 * 1024 * 1024
# Upper bound on KV tokens per chunk in the single-sequence path (scores are [q_tile, nH, chunk]).
_MAX_CHUNK_TOKENS = 512


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


def _online_update(carry, s, mask, v):
    """One online-softmax step.

    carry: m, l [Tq, nKV, g]; acc [Tq, nKV, g, D]. s: [Tq, nKV, g, C] f32 scores, mask broadcastable
    to s, v: [Tq or 1, C, nKV, D] f32 with invalid rows already zeroed.
    """
    m, l, acc = carry
    s = jnp.where(mask, s, _MASK)
    m_new = jnp.maximum(m, s.max(axis=-1))
    p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
    alpha = jnp.exp(m - m_new)
    l = alpha * l + p.sum(axis=-1)
    if v.shape[0] == 1:
        pv = jnp.einsum("tkgc,ckd->tkgd", p, v[0])
    else:
        pv = jnp.einsum("tkgc,tckd->tkgd", p, v)
    acc = alpha[..., None] * acc + pv
    return m_new, l, acc


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
      q_tile: tokens per tile (static tuning knob; results do not depend on it).
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

    seq, pos, valid = token_metadata(kv_lens, cu_q_lens, T)

    tq = max(1, min(q_tile, T))
    num_tiles = -(-T // tq)
    Tp = num_tiles * tq
    pad = Tp - T
    qf = q.reshape(T, nKV, g, D)
    if pad:
        qf = jnp.pad(qf, ((0, pad), (0, 0), (0, 0), (0, 0)))
        seq = jnp.pad(seq, (0, pad), constant_values=S - 1)
        pos = jnp.pad(pos, (0, pad))
        valid = jnp.pad(valid, (0, pad))
    # Padding tokens' positions are garbage: force -1 so they see no key and never extend a loop.
    pos = jnp.where(valid, pos, -1)

    # Chunk sizes in whole blocks (static).
    multi_blocks = max(1, _GATHER_BUDGET // (tq * bs * nKV * D))
    single_blocks = max(1, _MAX_CHUNK_TOKENS // bs)

    def chunk_blocks_ids(block_rows, c, nb):
        # block_rows: [..., max_blocks]; ids of chunk c ([..., nb]), clipped so stale/garbage table
        # entries and the ragged last chunk never index out of bounds (their data is masked).
        j = jnp.minimum(c * nb + jnp.arange(nb, dtype=jnp.int32), max_blocks - 1)
        ids = jnp.take(block_rows, j, axis=-1)
        return jnp.clip(ids, 0, num_cache_blocks - 1)

    def chunk_range(tpos, tvalid, chunk_tokens):
        # [first, last) chunk indices any valid token of the tile needs.
        hi = jnp.max(jnp.where(tvalid, tpos + 1, 0))
        if sliding_window is None:
            lo_tok = 0
        else:
            lo_tok = jnp.min(jnp.where(tvalid, jnp.maximum(tpos - sliding_window + 1, 0), 2**30))
            lo_tok = jnp.minimum(lo_tok, hi)
        return lo_tok // chunk_tokens, -(-hi // chunk_tokens)

    def kv_mask(tpos, kv_pos, kv_len):
        # tpos [Tq,1], kv_pos [1 or Tq, C], kv_len broadcastable -> [Tq, C]
        m = (kv_pos <= tpos) & (kv_pos < kv_len)
        if sliding_window is not None:
            m = m & (kv_pos > tpos - sliding_window)
        return m

    def scores(qt, k):
        # qt [Tq, nKV, g, D] f32; k [1 or Tq, C, nKV, D] f32 -> [Tq, nKV, g, C]
        if k.shape[0] == 1:
            s = jnp.einsum("tkgd,ckd->tkgc", qt, k[0])
        else:
            s = jnp.einsum("tkgd,tckd->tkgc", qt, k)
        return _softcap(s * sm_scale, soft_cap)

    def init_carry():
        return (jnp.full((tq, nKV, g), _MASK, jnp.float32), jnp.zeros((tq, nKV, g), jnp.float32),
                jnp.zeros((tq, nKV, g, D), jnp.float32))

    def single_seq_tile(qt, tseq, tpos, tvalid):
        s_id = tseq[0]
        kv_len = kv_lens[s_id]
        rows = block_tables[s_id]
        ct = single_blocks * bs
        lo, hi = chunk_range(tpos, tvalid, ct)

        def body(c, carry):
            ids = chunk_blocks_ids(rows, c, single_blocks)  # [nb]
            kv_pos = c * ct + jnp.arange(ct, dtype=jnp.int32)
            in_len = (kv_pos < kv_len)[:, None, None]
            # K needs no masking: a NaN score is replaced by `where` in _online_update.
            k = k_cache[ids].reshape(ct, nKV, D).astype(jnp.float32)
            v = jnp.where(in_len, v_cache[ids].reshape(ct, nKV, D).astype(jnp.float32), 0.0)
            mask = kv_mask(tpos[:, None], kv_pos[None, :], kv_len)[:, None, None, :]
            return _online_update(carry, scores(qt, k[None]), mask, v[None])

        return lax.fori_loop(lo, hi, body, init_carry())

    def multi_seq_tile(qt, tseq, tpos, tvalid):
        kv_len = kv_lens[tseq][:, None]  # [Tq, 1]
        rows = block_tables[tseq]  # [Tq, max_blocks]
        ct = multi_blocks * bs
        lo, hi = chunk_range(tpos, tvalid, ct)

        def body(c, carry):
            ids = chunk_blocks_ids(rows, c, multi_blocks)  # [Tq, nb]
            kv_pos = c * ct + jnp.arange(ct, dtype=jnp.int32)
            in_len = (kv_pos[None, :] < kv_len)[..., None, None]  # [Tq, C, 1, 1]
            k = k_cache[ids].reshape(tq, ct, nKV, D).astype(jnp.float32)
            v = jnp.where(in_len, v_cache[ids].reshape(tq, ct, nKV, D).astype(jnp.float32), 0.0)
            mask = kv_mask(tpos[:, None], kv_pos[None, :], kv_len)[:, None, None, :]
            return _online_update(carry, scores(qt, k), mask, v)

        return lax.fori_loop(lo, hi, body, init_carry())

    def tile_body(i, out):
        start = i * tq
        qt = lax.dynamic_slice_in_dim(qf, start, tq).astype(jnp.float32)
        tseq = lax.dynamic_slice_in_dim(seq, start, tq)
        tpos = lax.dynamic_slice_in_dim(pos, start, tq)
        tvalid = lax.dynamic_slice_in_dim(valid, start, tq)
        # Padding tokens (seq clipped to S-1) never make a tile "multi-sequence" by themselves:
        # they have no valid key, so any sequence's KV serves them.
        first = tseq[0]
        one_seq = jnp.all(jnp.where(tvalid, tseq == first, True))
        _, l, acc = lax.cond(one_seq, single_seq_tile, multi_seq_tile, qt, tseq, tpos, tvalid)
        o = jnp.where(l[..., None] > 0, acc / jnp.where(l > 0, l, 1.0)[..., None], 0.0)
        return lax.dynamic_update_slice_in_dim(out, o.astype(q.dtype), start, axis=0)

    # Tiles past the last real token are padding: skip them (their output stays zero).
    num_real_tiles = jnp.minimum(-(-cu_q_lens[S] // tq), num_tiles)
    out = jnp.zeros((Tp, nKV, g, D), q.dtype)
    out = lax.fori_loop(0, num_real_tiles, tile_body, out)
    return out[:T].reshape(T, nH, D)


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
