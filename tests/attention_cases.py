"""Builders of ragged paged-attention test cases, shared by the reference and kernel tests.

Every case is adversarial in the ways real engines go wrong: block tables are random permutations,
block 0 (the sink) and every slot past a sequence's kv_len hold NaN, unused block-table entries
point at other sequences' blocks, and token / sequence padding follows the real tokens.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass
class Case:
    q: np.ndarray  # [T, nH, D]
    k_cache: np.ndarray  # [num_blocks, block_size, nKV, D]
    v_cache: np.ndarray
    kv_lens: np.ndarray  # [S] int32
    block_tables: np.ndarray  # [S, max_blocks] int32
    cu_q_lens: np.ndarray  # [S+1] int32
    sm_scale: float

    def args(self):
        return (self.q, self.k_cache, self.v_cache, self.kv_lens, self.block_tables, self.cu_q_lens)


def make_case(seqs, *, block_size=8, num_kv_heads=2, group=2, head_dim=16, pad_tokens=3,
              pad_seqs=1, extra_blocks=2, dtype=np.float32, seed=0, max_blocks=None):
    """seqs: list of (q_len, kv_len) with 0 <= q_len <= kv_len."""
    rng = np.random.default_rng(seed)
    nH = num_kv_heads * group
    nb_per = [-(-kv // block_size) for _, kv in seqs]
    if max_blocks is None:
        max_blocks = max([1] + nb_per) + 1
    num_blocks = 1 + sum(nb_per) + extra_blocks
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = np.full(shape, np.nan, np.float32)
    v_cache = np.full(shape, np.nan, np.float32)
    perm = rng.permutation(np.arange(1, num_blocks))
    S = len(seqs) + pad_seqs
    # Unused entries point at arbitrary real blocks (possibly another sequence's): must be masked.
    block_tables = rng.integers(0, num_blocks, size=(S, max_blocks)).astype(np.int32)
    kv_lens = np.zeros(S, np.int32)
    q_lens = np.zeros(S, np.int32)
    nxt = 0
    for s, (q_len, kv_len) in enumerate(seqs):
        assert 0 <= q_len <= kv_len
        ids = perm[nxt:nxt + nb_per[s]]
        nxt += nb_per[s]
        block_tables[s, :len(ids)] = ids
        for j in range(kv_len):
            b, o = ids[j // block_size], j % block_size
            k_cache[b, o] = rng.standard_normal((num_kv_heads, head_dim))
            v_cache[b, o] = rng.standard_normal((num_kv_heads, head_dim))
        kv_lens[s] = kv_len
        q_lens[s] = q_len
    cu_q_lens = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    T = int(cu_q_lens[-1]) + pad_tokens
    q = rng.standard_normal((max(T, 1), nH, head_dim)).astype(np.float32)
    cast = lambda x: x.astype(dtype)
    return Case(cast(q), cast(k_cache), cast(v_cache), kv_lens, block_tables, cu_q_lens,
                float(head_dim) ** -0.5)
