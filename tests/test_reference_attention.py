"""jaxllm.attention.reference against an obvious float64 per-sequence numpy computation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention_cases import make_case
from jaxllm.attention.reference import dense_reference, ragged_paged_attention, write_kv

BS = 8


def _check(case, *, atol=2e-5, rtol=2e-5, **kw):
    out = ragged_paged_attention(*map(jnp.asarray, case.args()), sm_scale=case.sm_scale, **kw)
    out = np.asarray(out.astype(jnp.float32))
    assert out.dtype == np.float32 and out.shape == case.q.shape
    ref = dense_reference(*case.args(), sm_scale=case.sm_scale,
                          **{k: v for k, v in kw.items() if k != "q_tile"})
    assert np.all(np.isfinite(out)), "NaN/inf leaked from unused blocks"
    T_real = int(case.cu_q_lens[-1])
    np.testing.assert_array_equal(out[T_real:], 0.0)  # padding tokens -> zeros
    np.testing.assert_allclose(out, ref, atol=atol, rtol=rtol)


LENGTHS = [1, BS - 1, BS, BS + 1, 3 * BS + 5]


@pytest.mark.parametrize("kv_len", LENGTHS)
def test_decode_lengths(kv_len):
    _check(make_case([(1, kv_len), (1, 1), (1, 2 * BS)], block_size=BS, seed=kv_len))


@pytest.mark.parametrize("kv_len", LENGTHS)
def test_prefill_lengths(kv_len):
    # Full prefill (q_len == kv_len) and a chunked-prefill continuation (q_len < kv_len).
    _check(make_case([(kv_len, kv_len), ((kv_len + 1) // 2, kv_len)], block_size=BS, seed=kv_len))


@pytest.mark.parametrize("group", [1, 2, 4, 8])
def test_gqa_mixed(group):
    seqs = [(20, 45), (1, 9), (0, 0), (1, 1), (7, 7), (1, 30)]
    _check(make_case(seqs, block_size=BS, group=group, num_kv_heads=2 if group < 8 else 1, seed=group))


@pytest.mark.parametrize("q_tile", [1, 4, 32, 128])
def test_tile_size_invariance(q_tile):
    # Tiles of 4 make prefill tiles single-sequence and straddle sequence boundaries elsewhere.
    seqs = [(13, 40), (1, 17), (1, 8), (6, 6), (1, 3)]
    _check(make_case(seqs, block_size=BS, pad_tokens=9, seed=3), q_tile=q_tile)


def test_zero_length_and_all_padding():
    case = make_case([(0, 0), (0, 0)], block_size=BS, pad_tokens=5, pad_seqs=2)
    _check(case)
    case = make_case([(0, 5), (2, 2)], block_size=BS, pad_tokens=0, pad_seqs=0)  # no padding at all
    _check(case)


@pytest.mark.parametrize("window", [1, 5, BS, 3 * BS])
def test_sliding_window(window):
    seqs = [(30, 50), (1, 40), (5, 5), (1, 2)]
    _check(make_case(seqs, block_size=BS, seed=window), sliding_window=window, q_tile=8)


def test_soft_cap():
    seqs = [(12, 30), (1, 20)]
    case = make_case(seqs, block_size=BS)
    case.q *= 4.0  # make the cap bite
    _check(case, soft_cap=5.0)
    _check(case, soft_cap=5.0, sliding_window=7)


def test_bf16():
    seqs = [(16, 40), (1, 33), (1, 8)]
    case = make_case(seqs, block_size=BS, group=4, head_dim=32, dtype=jnp.bfloat16)
    out = ragged_paged_attention(*map(jnp.asarray, case.args()), sm_scale=case.sm_scale)
    assert out.dtype == jnp.bfloat16
    ref = dense_reference(*[np.asarray(a, np.float32) if a.dtype == jnp.bfloat16 else a
                            for a in case.args()], sm_scale=case.sm_scale)
    # bf16 output rounding (8 mantissa bits) dominates: softmax/accumulation are f32.
    np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=2e-2, rtol=2e-2)


def test_larger_block_size_and_head_dim():
    seqs = [(40, 100), (1, 64), (1, 65)]
    _check(make_case(seqs, block_size=32, head_dim=128, group=2, seed=7))


def test_write_kv_then_attend():
    # Write the last q_len tokens of each sequence through slot_mapping, then attend: must equal
    # attending over the cache that already held them.
    seqs = [(5, 12), (1, 9)]
    case = make_case(seqs, block_size=BS, pad_tokens=2)
    T, nKV, D = case.q.shape[0], case.k_cache.shape[2], case.k_cache.shape[3]
    slots = np.zeros(T, np.int32)  # padding tokens -> block 0 (sink)
    for s, (q_len, kv_len) in enumerate(seqs):
        for i in range(q_len):
            p = kv_len - q_len + i
            slots[case.cu_q_lens[s] + i] = case.block_tables[s, p // BS] * BS + p % BS
    blk, off = slots // BS, slots % BS
    k_new, v_new = case.k_cache[blk, off], case.v_cache[blk, off]
    kc, vc = case.k_cache.copy(), case.v_cache.copy()
    kc[blk[:-2], off[:-2]] = np.nan
    vc[blk[:-2], off[:-2]] = np.nan
    kc2, vc2 = jax.jit(write_kv, donate_argnums=(0, 1))(
        jnp.asarray(kc), jnp.asarray(vc), jnp.asarray(k_new), jnp.asarray(v_new), jnp.asarray(slots))
    real = slots[:-2]
    np.testing.assert_array_equal(np.asarray(kc2).reshape(-1, nKV, D)[real], case.k_cache.reshape(-1, nKV, D)[real])
    np.testing.assert_array_equal(np.asarray(vc2).reshape(-1, nKV, D)[real], case.v_cache.reshape(-1, nKV, D)[real])
    case.k_cache, case.v_cache = np.asarray(kc2), np.asarray(vc2)
    _check(case)


def test_decode_rows_of_very_different_lengths():
    # Per-token path: tokens are sorted by blocks needed and tiled; results must land on the right
    # rows whatever the order (lengths descending, ascending, shuffled) and across many tiles.
    lens = [1, 200, 3, 97, 16, 17, 150, 2, 64, 65, 33, 9, 120, 5, 48, 31, 180, 7, 8, 250]
    for seed, order in enumerate([lens, sorted(lens), sorted(lens, reverse=True)]):
        _check(make_case([(1, k) for k in order], block_size=BS, seed=seed), q_tile=32)
    _check(make_case([(1, k) for k in lens], block_size=BS, seed=9), q_tile=3)


def test_short_chunks_go_per_token_long_ones_shared():
    # q_len below the shared-tile threshold (speculative-style 2..7 tokens) next to prefill chunks
    # whose tiles end mid-sequence and start right after a previous sequence (no straddling).
    seqs = [(7, 30), (2, 2), (9, 9), (33, 70), (1, 40), (5, 19), (8, 100), (1, 1)]
    for q_tile in (4, 8, 32):
        _check(make_case(seqs, block_size=BS, pad_tokens=11, seed=q_tile), q_tile=q_tile)
    _check(make_case(seqs, block_size=BS, seed=5), sliding_window=6, q_tile=8)


@pytest.mark.parametrize("kv_len", [40, 140, 600])
def test_shared_tile_chunk_widths(kv_len):
    # The shared-KV tile picks its chunk width from its KV range: exercise each width, with a
    # chunked-prefill continuation (range starts far from the tile) and a sliding window.
    seqs = [(24, kv_len), (1, kv_len // 2 + 1)]
    _check(make_case(seqs, block_size=BS, seed=kv_len, head_dim=8))
    _check(make_case(seqs, block_size=BS, seed=kv_len + 1, head_dim=8), sliding_window=50)
