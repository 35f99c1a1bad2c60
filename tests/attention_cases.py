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



def outputs_across_company_and_chunking(fn, *, kv_len=77, block_size=8, seed=3, pad_to=None, case_kw=None,
                                        **kw):
    """The last query of one sequence (kv_len keys), decoded alone, with company, or as the end
    of a prefill chunk of 9 or 30 tokens next to other sequences: fn's output row for it in
    each batch (same keys, same query), as a list of [nH, D] arrays. A batch-invariant fn gives
    bitwise-equal rows. fn has the ragged paged attention signature; kw go to it, case_kw (head
    counts, head_dim) to make_case.

    pad_to=(T, S, num_blocks, max_blocks): the batches with company all get these shapes (one
    compile for slow interpreted kernels: only the first, alone, has a shape of its own)."""
    import jax.numpy as jnp

    case_kw = dict(case_kw or {}, block_size=block_size, seed=seed)
    base = make_case([(1, kv_len)], pad_tokens=0, pad_seqs=0, **case_kw)
    nb = -(-kv_len // block_size)
    outs = []
    for q_len, others in [(1, []), (1, [(1, 5), (12, 40)]), (9, [(3, 3)]), (30, [(1, 200), (16, 16)])]:
        seqs = others + [(q_len, kv_len)]
        shape_kw = {}
        if pad_to is not None and others:
            T, S, num_blocks, max_blocks = pad_to
            used = sum(-(-n // block_size) for _, n in seqs)
            shape_kw = dict(pad_tokens=T - sum(q for q, _ in seqs), pad_seqs=S - len(seqs),
                            extra_blocks=num_blocks - 1 - used, max_blocks=max_blocks)
        case = make_case(seqs, **case_kw, **shape_kw)
        s = len(others)
        case.k_cache[case.block_tables[s, :nb]] = base.k_cache[base.block_tables[0, :nb]]
        case.v_cache[case.block_tables[s, :nb]] = base.v_cache[base.block_tables[0, :nb]]
        last = int(case.cu_q_lens[s + 1]) - 1
        case.q[last] = base.q[0]
        out = fn(*map(jnp.asarray, case.args()), sm_scale=base.sm_scale, **kw)
        outs.append(np.asarray(out)[last])
    return outs
