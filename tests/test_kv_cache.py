"""KVCacheManager / BlockPool / BlockTable / hashing: exact block ids, free and eviction order,
ref counts, prefix-cache hits, rows, invariants. Pure numpy, milliseconds, no device."""

import ast
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from jaxllm.core.kv_cache import ComputedBlocks, KVCacheManager, hash_block_tokens, root_hash
from jaxllm.request import Request
from jaxllm.sampling_params import SamplingParams

BS = 4


def make(num_blocks=8, block_size=BS, max_num_seqs=3, max_blocks_per_seq=4, caching=True, **kw):
    return KVCacheManager(num_blocks, block_size, max_num_seqs, max_blocks_per_seq, enable_caching=caching, **kw)


def R(rid, tokens, salt=None, **sp):
    """A request whose prompt is `tokens` (an int n means n distinct tokens starting at 1000*len(rid))."""
    if isinstance(tokens, int):
        tokens = list(range(100 * (ord(rid[0]) - 96), 100 * (ord(rid[0]) - 96) + tokens))
    return Request(rid, list(tokens), SamplingParams(max_tokens=8, **sp), cache_salt=salt)


def grow(kv, req, num_tokens_total):
    """Allocate so the request's blocks cover `num_tokens_total` slots; True on success."""
    return kv.allocate_slots(req, num_tokens_total - req.num_computed_tokens)


def admit(kv, req, num_new=None):
    """What the scheduler does at admission, then "computes" the tokens. Returns the lookup."""
    computed = kv.get_computed_blocks(req)
    n = req.num_tokens - computed.num_tokens if num_new is None else num_new
    assert kv.allocate_slots(req, n, computed)
    req.num_computed_tokens += computed.num_tokens
    kv.cache_blocks(req, req.num_computed_tokens + n)
    req.num_computed_tokens += n
    kv.check_invariants()
    return computed


# ------------------------------------------------------------------ allocation (cache on or off)


@pytest.mark.parametrize("caching", [False, True])
def test_allocation_order_and_sink_never_handed_out(caching):
    kv = make(caching=caching)
    a, b = R("a", 12), R("b", 4)
    assert kv.num_free_blocks == 7 and kv.num_used_blocks == 0 and kv.usage == 0.0
    assert grow(kv, a, 5)  # 5 slots, block_size 4 -> 2 blocks
    assert kv.blocks_of("a") == [1, 2]
    assert grow(kv, b, 1)
    assert kv.blocks_of("b") == [3]
    a.num_computed_tokens = 5
    assert grow(kv, a, 8)  # still 2 blocks: no-op
    assert kv.blocks_of("a") == [1, 2]
    assert grow(kv, a, 9)  # grows by one, keeps the old ones
    assert kv.blocks_of("a") == [1, 2, 4]
    assert kv.num_free_blocks == 3 and kv.num_used_blocks == 4
    assert kv.usage == pytest.approx(4 / 7)
    kv.check_invariants()


def test_allocate_fails_without_change():
    kv = make(num_blocks=4)  # 3 usable blocks
    a, b = R("a", 16), R("b", 9)
    assert grow(kv, a, 8)  # blocks 1, 2
    table_before = kv.block_table.copy()
    assert not grow(kv, b, 9)  # needs 3, 1 free
    assert kv.blocks_of("b") == [] and not kv.has_blocks("b")
    assert not grow(kv, a, 16)  # needs 2 more, 1 free
    assert kv.blocks_of("a") == [1, 2]
    assert np.array_equal(kv.block_table, table_before)
    assert kv.num_free_blocks == 1
    with pytest.raises(KeyError):
        kv.row_of("b")
    kv.check_invariants()


def test_max_blocks_per_seq_limit():
    kv = make(num_blocks=10, max_blocks_per_seq=2)
    a = R("a", 9)
    assert not grow(kv, a, 9)  # 3 blocks > 2 per sequence
    assert grow(kv, a, 8)
    assert not grow(kv, a, 9)
    assert kv.blocks_of("a") == [1, 2]
    kv.check_invariants()


@pytest.mark.parametrize("caching", [False, True])
def test_free_order_tail_first_lru(caching):
    kv = make(caching=caching)
    a, b, c, d = R("a", 8), R("b", 8), R("c", 16), R("d", 1)
    admit(kv, a)  # [1, 2]
    admit(kv, b)  # [3, 4]
    kv.free(a)  # free queue: 5 6 7 | 2 1   (tail block first)
    assert kv.num_free_blocks == 5 and kv.pool.free_block_ids() == [5, 6, 7, 2, 1]
    kv.check_invariants()
    assert grow(kv, c, 16)  # 4 blocks: the never-used ones first, then the freed tail-first
    assert kv.blocks_of("c") == [5, 6, 7, 2]
    assert grow(kv, d, 1)
    assert kv.blocks_of("d") == [1]
    kv.free(R("unknown", 1))  # no-op
    kv.check_invariants()


def test_rows_assigned_lowest_first_and_reused():
    kv = make()
    reqs = {r: R(r, 4) for r in "abcd"}
    for r in "abc":
        grow(kv, reqs[r], 1)
    assert [kv.row_of(r) for r in "abc"] == [0, 1, 2]
    kv.free(reqs["b"])
    assert not kv.block_table[1].any()
    kv.free(reqs["a"])
    grow(kv, reqs["d"], 5)  # lowest free row is 0
    assert kv.row_of("d") == 0
    assert kv.block_table[0].tolist() == [4, 5, 0, 0]  # never-used blocks come before freed 2, 1
    kv.check_invariants()


def test_block_table_contents_exact():
    kv = make()
    a, b = R("a", 13), R("b", 4)
    grow(kv, a, 5)
    grow(kv, b, 4)
    a.num_computed_tokens = 5
    grow(kv, a, 13)
    assert kv.block_table.tolist() == [
        [1, 2, 4, 5],
        [3, 0, 0, 0],
        [0, 0, 0, 0],
    ]
    assert kv.block_table.dtype == np.int32 and kv.block_table.shape == (3, 4)


def test_exhaust_whole_pool_never_yields_block_zero():
    kv = make(num_blocks=6, block_size=1, max_num_seqs=5, max_blocks_per_seq=5)
    got = []
    reqs = [R(f"r{i}", 2) for i in range(5)]
    for r in reqs:
        assert grow(kv, r, 1)
        got += kv.blocks_of(r.request_id)
    assert sorted(got) == [1, 2, 3, 4, 5]
    assert not grow(kv, reqs[0], 2)
    assert kv.usage == 1.0
    kv.check_invariants()


def test_constructor_validation():
    with pytest.raises(ValueError, match="num_blocks"):
        KVCacheManager(1, 4, 2, 2)
    with pytest.raises(ValueError, match="block_size"):
        KVCacheManager(4, 0, 2, 2)
    with pytest.raises(ValueError, match="max_num_seqs"):
        KVCacheManager(4, 4, 0, 2)


# ------------------------------------------------------------------ prefix-cache hits


def test_shared_prefix_hits_exact_blocks_and_ref_counts():
    kv = make(num_blocks=10)
    a = R("a", 12)  # 3 full blocks
    admit(kv, a)
    assert kv.blocks_of("a") == [1, 2, 3] and kv.pool.num_cached_blocks == 3
    b = R("b", a.prompt_token_ids + [7, 8])  # a's 12 tokens + 2
    got = admit(kv, b)
    assert got == ComputedBlocks((1, 2, 3), 12, 14)
    assert kv.blocks_of("b") == [1, 2, 3, 4]
    assert kv.ref_counts.tolist()[:5] == [0, 2, 2, 2, 1]
    assert kv.block_table[kv.row_of("b")].tolist() == [1, 2, 3, 4]
    assert (kv.prefix_cache_queries, kv.prefix_cache_hits) == (12 + 14, 12)
    kv.free(a)  # shared blocks stay owned by b
    assert kv.ref_counts.tolist()[:5] == [0, 1, 1, 1, 1] and kv.num_free_blocks == 5
    kv.free(b)
    assert not kv.ref_counts.any() and kv.num_free_blocks == 9
    kv.check_invariants()


def test_hit_is_capped_so_the_last_token_is_computed():
    kv = make(num_blocks=10)
    a = R("a", 12)
    admit(kv, a)
    kv.free(a)  # free queue: 4..9, 3, 2, 1; all three blocks stay cached
    same = R("b", a.prompt_token_ids)
    got = admit(kv, same)
    # 12 tokens = 3 full cached blocks, but the 12th token's logits are needed: 2 blocks hit.
    assert got == ComputedBlocks((1, 2), 8, 12)
    # The third block is recomputed into a new block (4); block 3 keeps the hash, 4 stays uncached.
    assert kv.blocks_of("b") == [1, 2, 4]
    assert kv.pool.block_hashes[4] is None and kv.pool.get_cached_block(same.block_hashes[2]) == 3
    assert kv.pool.free_block_ids() == [5, 6, 7, 8, 9, 3]
    # One token more and all three blocks hit; one token fewer and only one full block may.
    assert kv.get_computed_blocks(R("c", a.prompt_token_ids + [5])).blocks == (1, 2, 3)
    assert kv.get_computed_blocks(R("d", a.prompt_token_ids[:8])).blocks == (1,)
    assert kv.get_computed_blocks(R("e", a.prompt_token_ids[:4])).blocks == ()
    kv.check_invariants()


def test_partial_block_is_never_hashed():
    kv = make()
    a = R("a", 7)
    admit(kv, a)
    assert len(a.block_hashes) == 1 and kv.pool.num_cached_blocks == 1
    a.output_token_ids.append(5)  # the 8th token fills block 1 once it is computed
    assert kv.allocate_slots(a, 1)
    kv.cache_blocks(a, 8)
    assert len(a.block_hashes) == 2 and kv.pool.num_cached_blocks == 2
    kv.check_invariants()


def test_eviction_is_lru_tail_first_and_removes_the_hash():
    kv = make(num_blocks=8, max_blocks_per_seq=6)
    a, b = R("a", 8), R("b", 8)
    admit(kv, a)  # [1, 2]
    admit(kv, b)  # [3, 4]
    kv.free(a)
    kv.free(b)
    assert kv.pool.free_block_ids() == [5, 6, 7, 2, 1, 4, 3]
    c = R("c", 16)
    admit(kv, c)  # the never-used blocks, then a's tail before a's head
    assert kv.blocks_of("c") == [5, 6, 7, 2]
    h_a = a.block_hashes
    assert kv.pool.get_cached_block(h_a[1]) is None and kv.pool.block_hashes[2] == c.block_hashes[3]
    assert kv.pool.get_cached_block(h_a[0]) == 1  # a's head is still there...
    assert kv.get_computed_blocks(R("a2", a.prompt_token_ids + [9])).blocks == (1,)  # ...its tail not
    assert kv.get_computed_blocks(R("b2", b.prompt_token_ids + [9])).blocks == (3, 4)
    kv.check_invariants()


def test_hit_takes_block_out_of_the_free_queue_wherever_it_is():
    kv = make(num_blocks=6)
    a = R("a", 8)
    admit(kv, a)
    kv.free(a)  # free: 3 4 5 2 1
    b = R("b", a.prompt_token_ids + [9])  # hits 1 (head of a's chain) and 2
    admit(kv, b)
    assert kv.blocks_of("b") == [1, 2, 3]
    assert kv.pool.free_block_ids() == [4, 5]
    kv.check_invariants()


def test_free_cached_hits_count_against_free_blocks():
    kv = make(num_blocks=6, max_blocks_per_seq=5)  # 5 usable
    a = R("a", 8)
    admit(kv, a)
    kv.free(a)  # 5 free blocks, 2 of them cached (1, 2)
    hog = R("h", 8)
    admit(kv, hog)  # takes 3 and 4
    b = R("b", a.prompt_token_ids + list(range(50, 59)))  # 17 tokens: hits 2 blocks, needs 3 more
    got = kv.get_computed_blocks(b)
    assert got.blocks == (1, 2)
    before = (kv.pool.free_block_ids(), kv.ref_counts.copy(), kv.prefix_cache_queries)
    # 3 free blocks (5, 2, 1): the 2 hits leave the free queue, so only 1 remains for 3 new ones.
    assert not kv.allocate_slots(b, 9, got)
    assert (kv.pool.free_block_ids(), kv.prefix_cache_queries) == (before[0], before[2])
    assert np.array_equal(kv.ref_counts, before[1]) and not kv.has_blocks("b")
    assert kv.allocate_slots(b, 1, got)  # a 1-token chunk fits: hits + one new block
    assert kv.blocks_of("b") == [1, 2, 5]
    kv.check_invariants()


def test_cache_salt_isolates_and_same_salt_shares():
    kv = make(num_blocks=12, max_num_seqs=5)
    tokens = list(range(10, 19))  # 9 tokens: 2 blocks may hit
    admit(kv, R("a", tokens, salt="tenant-a"))
    assert kv.get_computed_blocks(R("n", tokens)).blocks == ()
    assert kv.get_computed_blocks(R("b", tokens, salt="tenant-b")).blocks == ()
    assert kv.get_computed_blocks(R("e", tokens, salt="")).blocks == ()
    assert kv.get_computed_blocks(R("a2", tokens, salt="tenant-a")).blocks == (1, 2)
    admit(kv, R("n2", tokens))
    assert kv.get_computed_blocks(R("n3", tokens)).blocks == (4, 5)
    kv.check_invariants()


def test_prompt_logprobs_skip_the_lookup_but_fill_the_cache():
    kv = make()
    a = R("a", 9, prompt_logprobs=1)
    assert admit(kv, a) == ComputedBlocks()
    assert kv.pool.num_cached_blocks == 2
    b = R("b", a.prompt_token_ids, prompt_logprobs=0)
    assert kv.get_computed_blocks(b) == ComputedBlocks()
    assert kv.get_computed_blocks(R("c", a.prompt_token_ids)).blocks == (1, 2)


def test_caching_off_never_hits_or_caches():
    kv = make(caching=False)
    a = R("a", 9)
    admit(kv, a)
    assert a.block_hashes == [] and kv.pool.num_cached_blocks == 0
    assert kv.get_computed_blocks(R("b", a.prompt_token_ids)) == ComputedBlocks()
    assert kv.prefix_cache_queries == 0


def test_blocks_scheduled_but_never_computed_are_uncached_on_free():
    kv = make()
    a = R("a", 9)
    got = kv.get_computed_blocks(a)
    assert kv.allocate_slots(a, 9, got)
    kv.cache_blocks(a, 9)  # scheduled...
    assert kv.pool.num_cached_blocks == 2
    kv.free(a)  # ...but it left before the step ran: num_computed_tokens is still 0
    assert kv.pool.num_cached_blocks == 0
    assert kv.get_computed_blocks(R("b", a.prompt_token_ids)).blocks == ()
    kv.check_invariants()


def test_reset_prefix_cache():
    kv = make()
    a = R("a", 9)
    admit(kv, a)
    assert not kv.reset_prefix_cache()  # a holds blocks: nothing changes
    assert kv.pool.num_cached_blocks == 2
    kv.free(a)
    assert kv.reset_prefix_cache()
    assert kv.pool.num_cached_blocks == 0 and kv.num_free_blocks == 7
    assert kv.get_computed_blocks(R("b", a.prompt_token_ids)).blocks == ()
    kv.check_invariants()


# ------------------------------------------------------------------ hashing


def test_block_hashes_chain_and_depend_on_everything():
    root = root_hash()
    h = hash_block_tokens(root, [1, 2, 3, 4])
    assert len(h) == 32 and h == hash_block_tokens(root, [1, 2, 3, 4])
    assert h != hash_block_tokens(root, [1, 2, 3, 5])
    assert h != hash_block_tokens(root_hash(1), [1, 2, 3, 4])  # seeded
    assert h != hash_block_tokens(root, [1, 2, 3, 4], ("cache_salt", "x"))
    assert hash_block_tokens(root, [1], ("ab", "c")) != hash_block_tokens(root, [1], ("a", "bc"))
    assert hash_block_tokens(h, [5, 6, 7, 8]) != hash_block_tokens(root, [5, 6, 7, 8])  # chained
    # Same block content after different prefixes never hits.
    kv = make(num_blocks=12)
    admit(kv, R("a", [1, 2, 3, 4, 5, 6, 7, 8, 9]))
    assert kv.get_computed_blocks(R("b", [9, 9, 9, 9, 5, 6, 7, 8, 9])).blocks == ()
    # A manager with another seed shares no hash with this one.
    other = make(hash_seed=1)
    r = R("c", [1, 2, 3, 4, 5])
    other.get_computed_blocks(r)
    assert r.block_hashes[0] != kv.pool.block_hashes[1]


def test_block_hashes_do_not_depend_on_pythonhashseed():
    code = ("from jaxllm.core.kv_cache import hash_block_tokens, root_hash;"
            "print(hash_block_tokens(root_hash(), [1, 2, 3], ('cache_salt', 'tenant')).hex())")
    outs = set()
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        outs.add(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                check=True, cwd=pathlib.Path(__file__).resolve().parents[1]).stdout)
    assert len(outs) == 1


# ------------------------------------------------------------------ invariants


def test_check_invariants_detects_corruption():
    kv = make()
    a = R("a", 9)
    admit(kv, a)  # blocks [1, 2, 3], 1 and 2 cached
    pool = kv.pool
    pool.ref_counts[1] = 2
    with pytest.raises(AssertionError, match="ref counts"):
        kv.check_invariants()
    pool.ref_counts[1] = 1
    pool._free[2] = None  # owned and free
    with pytest.raises(AssertionError, match="both free and owned"):
        kv.check_invariants()
    del pool._free[2]
    del pool._free[4]  # leak block 4
    with pytest.raises(AssertionError, match="leaked"):
        kv.check_invariants()
    pool._free[4] = None
    kv.check_invariants()
    kv.block_table[kv.row_of("a"), 3] = 7
    with pytest.raises(AssertionError, match="block_table row"):
        kv.check_invariants()
    kv.block_table[kv.row_of("a"), 3] = 0
    kv.check_invariants()
    # A block reused for other content while its old hash still names it: b's block 3 carries a's
    # first-block hash.
    b = R("b", 4)
    grow(kv, b, 4)
    stale = pool.block_hashes[1]
    pool.uncache_block(1)
    pool.cache_block(kv.blocks_of("b")[0], stale)
    with pytest.raises(AssertionError, match="stale content"):
        kv.check_invariants()
    pool.uncache_block(kv.blocks_of("b")[0])
    pool.cache_block(1, stale)
    kv.check_invariants()
    pool._free[0] = None
    with pytest.raises(AssertionError, match="sink"):
        kv.check_invariants()


def test_core_never_imports_jax():
    # House rule 1: checked on the source, so it holds whatever jaxllm/__init__ imports.
    root = pathlib.Path(__file__).resolve().parents[1] / "jaxllm"
    for path in [root / "request.py", *sorted((root / "core").rglob("*.py"))]:
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for n in names:
                assert n.split(".")[0] != "jax", f"{path.name} imports {n}"
