"""Swap preemption on the host, no device: the swap plan with exact block ids (out, in, host pool
full -> recompute, abort of a swapped request, resume waits for all its blocks), the policy's
per-victim mode, and bad modes. The fake device (tests/test_prefix_caching.py) runs each plan's
copies, so a wrong plan shows up as a wrong K/V read."""

import pytest

from jaxllm.core.kv_cache import KVCacheManager
from jaxllm.core.policies import FCFSPolicy, policy_chooses_preemption_mode
from jaxllm.core.scheduler import Scheduler
from jaxllm.request import RequestStatus
from tests.test_prefix_caching import FakeDevice, plan, req


def make(num_blocks=7, num_cpu_blocks=5, mode="swap", policy="fcfs", caching=True):
    """6 usable device blocks of 4 tokens, a host pool of num_cpu_blocks - 1 usable blocks."""
    kv = KVCacheManager(num_blocks, 4, 4, 6, enable_caching=caching, num_cpu_blocks=num_cpu_blocks)
    s = Scheduler(kv, policy, 4, 64, 24, clock=lambda: 0.0, preemption_mode=mode)
    return s, kv, FakeDevice(kv)


def step(s, dev):
    out = s.schedule()
    dev.execute(out)  # swap-outs, swap-ins, then the step's writes and checked reads
    s.update(out, {x.request_id: 7 for x in out.scheduled if x.samples})
    s.kv_cache_manager.check_invariants()
    return out


def fill(s, dev):
    """a (16 tokens, 4 blocks) and b (8 tokens, blocks 5 and 6) fill the cache; a's first decode
    needs a 5th block, so b (the latest arrival) is preempted."""
    a = req("a", range(100, 116), max_tokens=4)
    b = req("b", range(200, 208), max_tokens=6, arrival=1.0)
    s.add_request(a)
    s.add_request(b)
    out = step(s, dev)
    assert plan(out) == [("a", 0, 16), ("b", 0, 8)] and s.kv_cache_manager.blocks_of("b") == [5, 6]
    return a, b


def test_swap_out_then_in_with_exact_block_ids():
    s, kv, dev = make()
    a, b = fill(s, dev)
    out = step(s, dev)
    # b's two computed blocks go to host blocks 1, 2; its device blocks are freed tail first, so
    # a's new block is b's old tail 6 (the copy read it before a's step wrote it).
    assert out.preempted == [b] and out.blocks_to_swap_out == [(5, 1), (6, 2)] and not out.blocks_to_swap_in
    assert b.status == RequestStatus.SWAPPED and b.num_computed_tokens == 8 and b.num_tokens == 9
    assert kv.cpu_blocks_of("b") == [1, 2] and kv.num_free_cpu_blocks == 2 and not kv.has_blocks("b")
    assert kv.blocks_of("a") == [1, 2, 3, 4, 6] and kv.pool.free_block_ids() == [5]
    assert (s.num_swap_outs, s.num_blocks_swapped_out, s.num_preemptions) == (1, 2, 1)
    while not b.status == RequestStatus.RUNNING:
        out = step(s, dev)
    # a finished (freeing 6, 4, 3, 2, 1 tail first behind 5): b takes 5, 6 for its swapped blocks
    # and 4 for its 9th token, which is all it computes: its 8 tokens came back from the host.
    assert a.is_finished and plan(out) == [("b", 8, 1)]
    assert out.blocks_to_swap_in == [(1, 5), (2, 6)] and not out.blocks_to_swap_out
    assert kv.blocks_of("b") == [5, 6, 4] and kv.num_free_cpu_blocks == 4 and not kv.is_swapped("b")
    assert (s.num_swap_ins, s.num_blocks_swapped_in) == (1, 2)
    while s.has_unfinished_requests():
        step(s, dev)
    assert b.output_token_ids == [7] * 6 and kv.num_used_blocks == 0


def test_recompute_mode_plans_no_copies():
    s, kv, dev = make(mode="recompute")
    a, b = fill(s, dev)
    out = step(s, dev)
    assert out.preempted == [b] and not out.has_swaps
    assert b.status == RequestStatus.PREEMPTED and b.num_computed_tokens == 0 and not kv.is_swapped("b")
    assert s.num_swap_outs == s.num_swap_fallbacks == 0


def test_full_host_pool_falls_back_to_recompute():
    # One usable host block; b needs two.
    s, kv, dev = make(num_cpu_blocks=2)
    a, b = fill(s, dev)
    out = step(s, dev)
    assert out.preempted == [b] and not out.has_swaps
    assert b.status == RequestStatus.PREEMPTED and b.num_computed_tokens == 0
    assert (s.num_swap_outs, s.num_swap_fallbacks, s.num_preemptions) == (0, 1, 1)
    assert kv.num_free_cpu_blocks == 1
    while s.has_unfinished_requests():
        step(s, dev)
    assert b.output_token_ids == [7] * 6


def test_no_host_pool_means_every_swap_recomputes():
    s, kv, dev = make(num_cpu_blocks=0)
    a, b = fill(s, dev)
    out = step(s, dev)
    assert not out.has_swaps and b.status == RequestStatus.PREEMPTED and s.num_swap_fallbacks == 1


def test_abort_of_a_swapped_request_frees_its_host_blocks():
    s, kv, dev = make()
    a, b = fill(s, dev)
    step(s, dev)
    assert kv.cpu_blocks_of("b") == [1, 2]
    s.abort_request("b")
    assert b.status == RequestStatus.FINISHED_ABORTED and not kv.is_swapped("b")
    assert kv.num_free_cpu_blocks == 4 and kv.cpu_pool.free_block_ids() == [3, 4, 2, 1]
    kv.check_invariants()
    # The freed host blocks serve the next swap, from the free queue's head: c takes device
    # block 5, a's next decode preempts it into host block 3, and it comes back into block 5.
    c = req("c", range(300, 304), max_tokens=8, arrival=2.0)
    s.add_request(c)
    out = step(s, dev)
    assert plan(out) == [("a", 17, 1), ("c", 0, 4)] and kv.blocks_of("c") == [5]
    out = step(s, dev)
    assert out.preempted == [c] and out.blocks_to_swap_out == [(5, 3)]
    out = step(s, dev)  # a finished in the step before
    assert plan(out) == [("c", 4, 1)] and out.blocks_to_swap_in == [(3, 5)] and kv.blocks_of("c") == [5, 6]


def test_swapped_request_resumes_with_all_its_blocks_or_waits():
    s, kv, dev = make()
    a, b = fill(s, dev)
    step(s, dev)  # b swapped out: it needs 3 device blocks back (2 swapped + 1 new token)
    c = req("c", range(400, 404), max_tokens=1, arrival=2.0)  # one block
    s.add_request(c)
    out = step(s, dev)
    # One device block is free: b cannot have all three, so it waits and, head of line, c waits too.
    assert kv.num_free_blocks == 1 and plan(out) == [("a", 17, 1)] and not out.blocks_to_swap_in
    assert b.status == RequestStatus.SWAPPED and c.status == RequestStatus.WAITING


def test_shared_blocks_are_copied_and_stay_with_their_other_owner():
    # a and b share a's first full block (prefix cache); b swaps out its own copy of it and drops
    # its reference: a still holds block 1, and the host block is b's alone.
    s, kv, dev = make()
    a = req("a", list(range(100, 112)), max_tokens=4)
    b = req("b", list(range(100, 104)) + list(range(500, 508)), max_tokens=8, arrival=1.0)
    s.add_request(a)
    s.add_request(b)
    out = step(s, dev)
    assert kv.blocks_of("a")[0] == kv.blocks_of("b")[0] == 1 and kv.ref_counts[1] == 2
    while not s.num_swap_outs:
        out = step(s, dev)
    assert out.preempted == [b] and out.blocks_to_swap_out[0] == (1, 1)
    assert kv.ref_counts[1] == 1 and kv.blocks_of("a")[0] == 1
    while s.has_unfinished_requests():
        step(s, dev)  # the fake device checks every token b reads after its swap-in
    assert s.num_swap_ins == 1 and kv.num_used_blocks == 0


class SwapLong(FCFSPolicy):
    def preemption_mode(self, victim):
        return "swap" if victim.num_computed_tokens >= 8 else "recompute"


def test_policy_chooses_the_mode_per_victim():
    # The scheduler is in recompute mode; the policy swaps b (8 computed tokens) anyway.
    s, kv, dev = make(mode="recompute", policy=SwapLong())
    a, b = fill(s, dev)
    out = step(s, dev)
    assert b.status == RequestStatus.SWAPPED and out.blocks_to_swap_out == [(5, 1), (6, 2)]
    assert policy_chooses_preemption_mode(SwapLong) and policy_chooses_preemption_mode(SwapLong())
    assert not policy_chooses_preemption_mode("fcfs") and not policy_chooses_preemption_mode(FCFSPolicy())


def test_bad_modes_are_named():
    kv = KVCacheManager(7, 4, 4, 6)
    with pytest.raises(ValueError, match="preemption_mode must be 'recompute' or 'swap', got 'discard'"):
        Scheduler(kv, "fcfs", 4, 64, 24, preemption_mode="discard")

    class Bad(FCFSPolicy):
        def preemption_mode(self, victim):
            return "drop"

    s, kv, dev = make(policy=Bad())
    fill(s, dev)
    with pytest.raises(ValueError, match="'drop'"):
        s.schedule()
