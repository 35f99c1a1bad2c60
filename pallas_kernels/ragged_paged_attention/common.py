"""Pieces shared by the TPU and GPU ragged paged attention kernels: argument validation and the
double-buffered KV pipeline.

Kernels index memory with the values they are given; a wrong shape there is a silent wrong answer
or a device fault, not an exception. So every static property is checked up front and each error
names the offending values.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

# Finite "minus infinity" for masked scores: exp(mask - mask) stays finite for fully masked rows.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def validate_inputs(q, k_cache, v_cache, kv_lens, block_tables, cu_q_lens, *, sm_scale,
                    sliding_window=None, soft_cap=None):
    """Raise ValueError unless the arguments follow the ragged paged attention contract.

    q: [T, nH, D]; k_cache, v_cache: [num_blocks, block_size, nKV, D]; kv_lens: [S] int32;
    block_tables: [S, max_blocks] int32; cu_q_lens: [S+1] int32.
    Returns (T, nH, D, num_blocks, block_size, nKV, S, max_blocks).
    """
    if q.ndim != 3:
        raise ValueError(f"q must be [T, num_heads, head_dim], got shape {q.shape}")
    if k_cache.ndim != 4:
        raise ValueError(f"k_cache must be [num_blocks, block_size, num_kv_heads, head_dim], "
                         f"got shape {k_cache.shape}")
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache.shape={k_cache.shape} != v_cache.shape={v_cache.shape}")
    if k_cache.dtype != v_cache.dtype:
        raise ValueError(f"k_cache.dtype={k_cache.dtype} != v_cache.dtype={v_cache.dtype}")
    T, nH, D = q.shape
    num_blocks, block_size, nKV, Dk = k_cache.shape
    if Dk != D:
        raise ValueError(f"q head_dim {D} (q.shape={q.shape}) != cache head_dim {Dk} "
                         f"(k_cache.shape={k_cache.shape})")
    if nKV == 0 or nH % nKV:
        raise ValueError(f"num_heads={nH} (q.shape={q.shape}) must be a positive multiple of "
                         f"num_kv_heads={nKV} (k_cache.shape={k_cache.shape})")
    if block_tables.ndim != 2:
        raise ValueError(f"block_tables must be [S, max_blocks], got shape {block_tables.shape}")
    S, max_blocks = block_tables.shape
    if kv_lens.shape != (S,):
        raise ValueError(f"kv_lens.shape={kv_lens.shape} must be ({S},) = (block_tables.shape[0],)")
    if cu_q_lens.shape != (S + 1,):
        raise ValueError(f"cu_q_lens.shape={cu_q_lens.shape} must be ({S + 1},) = "
                         f"(block_tables.shape[0] + 1,)")
    for name, a in (("kv_lens", kv_lens), ("block_tables", block_tables), ("cu_q_lens", cu_q_lens)):
        if a.dtype != jnp.int32:
            raise ValueError(f"{name}.dtype={a.dtype} must be int32")
    if S == 0 or max_blocks == 0:
        raise ValueError(f"block_tables.shape={block_tables.shape} must be non-empty")
    if not isinstance(sm_scale, (int, float)):
        raise ValueError(f"sm_scale must be a python float (static), got {sm_scale!r}")
    if sliding_window is not None and (not isinstance(sliding_window, int) or sliding_window <= 0):
        raise ValueError(f"sliding_window={sliding_window!r} must be None or a positive int")
    if soft_cap is not None and (not isinstance(soft_cap, (int, float)) or soft_cap <= 0):
        raise ValueError(f"soft_cap={soft_cap!r} must be None or a positive float")
    return T, nH, D, num_blocks, block_size, nKV, S, max_blocks


def tile_seq_ranges(cu_q_lens, num_tiles, tile):
    """[2 * num_tiles] int32: for tile i (tokens [i*tile, (i+1)*tile)), the first sequence and one
    past the last sequence owning one of its tokens (interleaved, flat so SMEM does not pad it).
    Tiles past the last real token get an empty range."""
    S = cu_q_lens.shape[0] - 1
    starts = jnp.arange(num_tiles, dtype=jnp.int32) * tile
    ends = cu_q_lens[1:]
    first = jnp.searchsorted(ends, starts, side="right").astype(jnp.int32)
    last = jnp.searchsorted(ends, starts + tile - 1, side="right").astype(jnp.int32)
    end = jnp.minimum(last + 1, S)
    first = jnp.minimum(first, end)
    return jnp.stack([first, end], axis=1).reshape(-1)


def query_layout(T, kv_lens, cu_q_lens, tq, batch_invariant):
    """Where the T query tokens go in the kernels' tiles of tq tokens, and which rows and tiles
    belong to which sequence. kv_lens: [S]; cu_q_lens: [S + 1] int32.

    Packed (batch_invariant=False): the flattened batch cut into tiles of tq consecutive tokens;
    sequence s owns rows [cu_q_lens[s], cu_q_lens[s + 1]) and a tile may hold several sequences.

    Aligned (batch_invariant=True): tile j of a sequence holds its absolute positions
    [j * tq, (j + 1) * tq), so a token always sits in the same row of the same-shaped matmuls,
    whatever the rest of the step (other sequences, how its own prompt was chunked). Rows of
    positions not computed in this step are left out of the sequence's row range (masked: their
    output is dropped). Every tile holds at least one token of the step and a sequence of q_len
    tokens spans at most (q_len + 2 tq - 2) // tq tiles, so the grid has
    min(T, (T + S * (2 tq - 2)) // tq) tiles (static), the unused ones with an empty range.

    Returns (rows, num_tiles, q_bounds, tile_seqs):
      rows: [T] int32, the row of each token in the [num_tiles * tq] layout (None when packed:
        the identity); padding tokens get num_tiles * tq (out of range: dropped / read as 0).
      q_bounds: [2 * S] int32, (first row, one past the last row) of each sequence, interleaved.
      tile_seqs: [2 * num_tiles] int32, (first, one past the last) sequence of each tile.
    """
    S = kv_lens.shape[0]
    starts, ends = cu_q_lens[:-1], cu_q_lens[1:]
    if not batch_invariant:
        num_tiles = cdiv(T, tq)
        q_bounds = jnp.stack([starts, ends], axis=1).reshape(-1)
        return None, num_tiles, q_bounds, tile_seq_ranges(cu_q_lens, num_tiles, tq)
    num_tiles = max(1, min(T, (T + S * (2 * tq - 2)) // tq))
    q_lens = ends - starts
    first_pos = kv_lens - q_lens  # position of each sequence's first token of this step
    j_lo = first_pos // tq
    tiles = jnp.where(q_lens > 0, (kv_lens + tq - 1) // tq - j_lo, 0)
    cu_tiles = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(tiles).astype(jnp.int32)])
    # Row of a sequence's first token: its first tile's row plus the token's offset in the tile.
    first_row = jnp.where(q_lens > 0, tq * (cu_tiles[:-1] - j_lo) + first_pos, 0)
    q_bounds = jnp.stack([first_row, first_row + q_lens], axis=1).reshape(-1).astype(jnp.int32)
    t = jnp.arange(T, dtype=jnp.int32)
    seq = jnp.minimum(jnp.searchsorted(ends, t, side="right"), S - 1)
    rows = jnp.where(t < cu_q_lens[S], first_row[seq] + t - starts[seq], num_tiles * tq)
    i = jnp.arange(num_tiles, dtype=jnp.int32)
    tile_seq = jnp.searchsorted(cu_tiles[1:], i, side="right").astype(jnp.int32)
    live = i < cu_tiles[S]
    tile_seqs = jnp.stack([jnp.where(live, tile_seq, S), jnp.where(live, tile_seq + 1, S)], axis=1)
    return rows.astype(jnp.int32), num_tiles, q_bounds, tile_seqs.reshape(-1).astype(jnp.int32)


def to_tiles(q, rows, num_tiles, tq, nKV):
    """q [T, nH, D] -> [nKV, num_tiles * tq * group, D] (row = token row * group + q head within
    its KV group), tokens placed at `rows` (query_layout; None: in order, zero-padded)."""
    T, nH, D = q.shape
    group = nH // nKV
    qt = q.reshape(T, nKV, group, D)
    Tp = num_tiles * tq
    if rows is None:
        qt = jnp.pad(qt, ((0, Tp - T), (0, 0), (0, 0), (0, 0))) if Tp != T else qt
    else:
        qt = jnp.zeros((Tp, nKV, group, D), q.dtype).at[rows].set(qt, mode="drop")
    return qt.transpose(1, 0, 2, 3).reshape(nKV, Tp * group, D)


def from_tiles(out, rows, T, nH):
    """Inverse of to_tiles: [nKV, Tp * group, D] -> [T, nH, D] (padding tokens 0)."""
    nKV, _, D = out.shape
    group = nH // nKV
    out = out.reshape(nKV, -1, group, D).transpose(1, 0, 2, 3).reshape(-1, nH, D)
    if rows is None:
        return out[:T]
    return jnp.take(out, rows, axis=0, mode="fill", fill_value=0)


def cdiv(a, b):
    return (a + b - 1) // b


def round_up(x, m):
    return -(-x // m) * m


def write_kv(k_cache, v_cache, k, v, slot_mapping):
    """Scatter this step's K/V into the paged cache (jnp on purpose, not a Pallas kernel).

    k_cache, v_cache: [num_blocks, block_size, nKV, D]; k, v: [T, nKV, D]; slot_mapping: [T] int32
    (slot = block_id * block_size + offset; padding tokens -> block 0, a sink).

    Why a scatter: it moves T * nKV * D elements per layer (the attention that follows reads
    kv_len times more), XLA lowers it to an in-place dynamic update when the caller donates the
    cache buffers (the engine's jitted step must donate them, or XLA copies the whole cache), and
    it fuses with the K/V projection. A Pallas version would need input_output_aliases plus one
    tiny DMA per token and gains nothing measurable; it becomes worth writing only for quantised
    caches (scale computation per block).
    """
    block_size = k_cache.shape[1]
    blk = slot_mapping // block_size
    off = slot_mapping % block_size
    k_cache = k_cache.at[blk, off].set(k.astype(k_cache.dtype), mode="promise_in_bounds")
    v_cache = v_cache.at[blk, off].set(v.astype(v_cache.dtype), mode="promise_in_bounds")
    return k_cache, v_cache


def kv_step_range(q_start, q_end, kv_len, tile_start, tile_end, step_tokens: int, sliding_window):
    """[lo, hi) of the KV steps (of step_tokens keys each) that the tokens of sequence
    [q_start, q_end) falling in the tile [tile_start, tile_end) can see; empty when none fall in it.

    Token t sits at position ctx + t with ctx = kv_len - q_len - q_start and sees keys up to its
    position (and, with a window, above position - window). Operands are non-negative, so lax.div
    (which both Mosaic backends lower for scalars) is floor division here.
    """
    c = jnp.int32(step_tokens)
    tok_lo = jnp.maximum(q_start, tile_start)
    tok_hi = jnp.minimum(q_end, tile_end)
    ctx = kv_len - (q_end - q_start) - q_start  # pos(token t) = ctx + t
    kv_hi = ctx + tok_hi  # one past the last visible key
    if sliding_window is None:
        lo = jnp.int32(0)
    else:
        lo = lax.div(jnp.maximum(ctx + tok_lo - sliding_window + 1, 0), c)
    hi = jnp.where(tok_hi > tok_lo, lax.div(jnp.maximum(kv_hi, 0) + c - 1, c), lo)
    return lo, jnp.maximum(hi, lo)


def double_buffered_seq_loop(s_begin, s_end, seq_steps, start_fetch, consume, state):
    """The KV pipeline of both kernels (traced inside a kernel body).

    For each sequence s in [s_begin, s_end) and each of its KV steps in seq_steps(s) = [lo, hi),
    the copy for the next step (or for the next sequence's first step) is started with
    start_fetch(s', step', other_slot) before consume(s, step, slot, state) -> state works on
    the current buffer `slot`; so copy and compute overlap across sequence boundaries too.
    consume must wait for its own copy (a DMA semaphore, a barrier). Returns the final state.
    """

    def seq_body(s, carry):
        slot, fetched, state = carry
        lo, hi = seq_steps(s)

        @pl.when((fetched == 0) & (lo < hi))
        def _():
            start_fetch(s, lo, slot)

        has_next_seq = s + 1 < s_end
        nlo, nhi = seq_steps(jnp.minimum(s + 1, s_end - 1))
        next_seq_fetch = has_next_seq & (nlo < nhi)

        def step_body(step, c):
            slot, state = c

            @pl.when(step + 1 < hi)
            def _():
                start_fetch(s, step + 1, 1 - slot)

            @pl.when((step + 1 == hi) & next_seq_fetch)
            def _():
                start_fetch(s + 1, nlo, 1 - slot)

            return 1 - slot, consume(s, step, slot, state)

        slot, state = lax.fori_loop(lo, hi, step_body, (slot, state))
        # The next sequence's first copy is already in flight iff this one prefetched it.
        fetched = jnp.where((lo < hi) & next_seq_fetch, 1, 0).astype(jnp.int32)
        return slot, fetched, state

    _, _, state = lax.fori_loop(s_begin, s_end, seq_body, (jnp.int32(0), jnp.int32(0), state))
    return state
