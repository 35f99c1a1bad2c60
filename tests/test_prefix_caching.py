"""Prefix caching through the scheduler, with a fake device instead of jax: hits in the same step
and across steps, chunked, preempted, prompt logprobs, reset; and a property test whose fake
device checks that every token a step reads is the K/V its request would have written."""

import random

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from jaxllm.core.kv_cache import KVCacheManager, cdiv
from jaxllm.core.scheduler import Scheduler
from jaxllm.request import Request, RequestStatus
from jaxllm.sampling_params import SamplingParams
from tests.helpers.sched_ops import drain, end_request, make_scheduler

EOS = 2


class FakeDevice:
    """The KV cache as a dict: slot -> what the K/V there was computed from.

    A token's K/V depends on its whole prefix (and the cache salt never changes it, but requests
    with different salts must not share, so it is recorded too): content = (salt, tokens[:pos+1]).
    `execute` writes every scheduled token first and then checks every read, as the jaxllm step
    does in each layer (runner.make_paged_attention).
    """

    def __init__(self, kv: KVCacheManager):
        self.kv = kv
        self.slots: dict[int, tuple] = {}
        self.host: dict[int, tuple] = {}  # the host swap pool, slot -> content, like `slots`

    def _slot(self, req, pos: int) -> int:
        bs = self.kv.block_size
        return int(self.kv.block_table[self.kv.row_of(req.request_id), pos // bs]) * bs + pos % bs

    def swap(self, out) -> None:
        """The step's copies in the engine's order: swap-outs, then swap-ins. A host block read
        by a swap-in is cleared afterwards, so reading it again (a stale plan) is caught."""
        bs = self.kv.block_size
        dests = {c for _, c in out.blocks_to_swap_out}
        assert dests.isdisjoint(c for c, _ in out.blocks_to_swap_in), "host block written and read in one step"
        for g, c in out.blocks_to_swap_out:
            for j in range(bs):
                self.host[c * bs + j] = self.slots.get(g * bs + j)
        for c, g in out.blocks_to_swap_in:
            for j in range(bs):
                self.slots[g * bs + j] = self.host.pop(c * bs + j)

    def execute(self, out) -> None:
        self.swap(out)
        for item in out.scheduled:
            req, start = item.request, item.num_computed_tokens
            tokens = req.all_token_ids
            for pos in range(start, start + item.num_new_tokens):
                self.slots[self._slot(req, pos)] = (req.cache_salt, tuple(tokens[: pos + 1]))
        for item in out.scheduled:
            req = item.request
            tokens = req.all_token_ids
            for pos in range(item.num_computed_tokens + item.num_new_tokens):
                got = self.slots.get(self._slot(req, pos))
                assert got == (req.cache_salt, tuple(tokens[: pos + 1])), (
                    f"{req.request_id} reads wrong K/V at position {pos}: {got}"
                )

    def check_cached_blocks(self, requests) -> None:
        """Every cached block holds the content its hash names (after the step's writes)."""
        bs = self.kv.block_size
        named = {}
        for r in requests:
            tokens = r.all_token_ids
            for i, h in enumerate(r.block_hashes):
                named[h] = [(r.cache_salt, tuple(tokens[: i * bs + j + 1])) for j in range(bs)]
        for h, block in self.kv.pool.cached_block_hash_to_block.items():
            held = [self.slots.get(block * bs + j) for j in range(bs)]
            assert held == named[h], f"block {block} is cached under a hash naming other content"


def make(num_blocks=64, block_size=4, max_num_seqs=4, max_num_batched_tokens=64, max_model_len=64,
         policy="fcfs", chunked=True):
    kv = KVCacheManager(num_blocks, block_size, max_num_seqs, cdiv(max_model_len, block_size))
    s = Scheduler(kv, policy, max_num_seqs, max_num_batched_tokens, max_model_len,
                  enable_chunked_prefill=chunked, clock=lambda: 0.0)
    return s, kv, FakeDevice(kv)


def req(rid, tokens, max_tokens=4, arrival=0.0, salt=None, **sp):
    return Request(rid, list(tokens), SamplingParams(max_tokens=max_tokens, **sp), eos_token_ids=(EOS,),
                   arrival_time=arrival, cache_salt=salt)


def step(s, dev, token=7):
    out = s.schedule()
    dev.execute(out)
    finished = s.update(out, {x.request_id: token for x in out.scheduled if x.samples})
    s.kv_cache_manager.check_invariants()
    return out, finished


def plan(out):
    return [(x.request_id, x.num_computed_tokens, x.num_new_tokens) for x in out.scheduled]


PROMPT = list(range(10, 24))  # 14 tokens: 3 full blocks of 4


def test_same_prompt_admitted_in_the_same_step_hits_blocks_scheduled_in_it():
    s, kv, dev = make()
    a, b = req("a", PROMPT), req("b", PROMPT, arrival=1.0)
    s.add_request(a)
    s.add_request(b)
    out, _ = step(s, dev)
    # b's first 3 blocks are a's, scheduled for computation earlier in this very step.
    assert plan(out) == [("a", 0, 14), ("b", 12, 2)]
    assert kv.blocks_of("a")[:3] == kv.blocks_of("b")[:3] == [1, 2, 3]
    assert kv.blocks_of("a") == [1, 2, 3, 4] and kv.blocks_of("b") == [1, 2, 3, 5]
    assert (a.num_cached_tokens, b.num_cached_tokens) == (0, 12)
    assert (kv.prefix_cache_queries, kv.prefix_cache_hits) == (28, 12)
    while s.has_unfinished_requests():
        step(s, dev)
    assert kv.num_used_blocks == 0


def test_hit_across_steps_and_after_the_owner_finished():
    s, kv, dev = make()
    a = req("a", PROMPT, max_tokens=1)
    s.add_request(a)
    step(s, dev)
    assert a.is_finished and kv.num_used_blocks == 0
    b = req("b", PROMPT + [99])
    s.add_request(b)
    out, _ = step(s, dev)
    assert plan(out) == [("b", 12, 3)] and b.num_cached_tokens == 12
    assert kv.blocks_of("b")[:3] == [1, 2, 3]


def test_chunked_prefill_blocks_become_hittable_chunk_by_chunk():
    s, kv, dev = make(max_num_batched_tokens=6)
    a, b = req("a", PROMPT), req("b", PROMPT, arrival=1.0)
    s.add_request(a)
    s.add_request(b)
    out, _ = step(s, dev)
    assert plan(out) == [("a", 0, 6)]  # a's block 0 is full and cached now; the budget is spent
    out, _ = step(s, dev)
    # a's second chunk fills blocks 1 and 2 (tokens 6..11): b, admitted after it, hits all three.
    assert plan(out) == [("a", 6, 6)]
    out, _ = step(s, dev)
    assert plan(out) == [("a", 12, 2), ("b", 12, 2)] and b.num_cached_tokens == 12
    while s.has_unfinished_requests():
        step(s, dev)


def test_different_salts_never_share_and_same_salts_do():
    s, kv, dev = make()
    rs = [req("a", PROMPT, salt="t1"), req("b", PROMPT, salt="t2", arrival=1.0),
          req("c", PROMPT, arrival=2.0), req("d", PROMPT, salt="t1", arrival=3.0)]
    for r in rs:
        s.add_request(r)
    out, _ = step(s, dev)
    assert [r.num_cached_tokens for r in rs] == [0, 0, 0, 12]
    assert set(kv.blocks_of("a")).isdisjoint(kv.blocks_of("b")) and set(kv.blocks_of("b")).isdisjoint(kv.blocks_of("c"))
    assert kv.blocks_of("d")[:3] == kv.blocks_of("a")[:3]


def test_prompt_logprobs_request_computes_its_whole_prompt():
    s, kv, dev = make()
    s.add_request(req("a", PROMPT))
    s.add_request(req("b", PROMPT, arrival=1.0, prompt_logprobs=1))
    out, _ = step(s, dev)
    assert plan(out) == [("a", 0, 14), ("b", 0, 14)]
    assert set(kv.blocks_of("a")).isdisjoint(kv.blocks_of("b"))
    assert kv.prefix_cache_queries == 14  # b looked nothing up


def test_preempted_request_hits_its_own_blocks_on_resume():
    # 6 usable blocks of 4. a (16 tokens) and b (8 tokens) fill them; a's decode preempts b.
    s, kv, dev = make(num_blocks=7, max_model_len=24)
    a = req("a", range(100, 116), max_tokens=4)  # at most 19 slots: 5 blocks
    b = req("b", range(200, 208), max_tokens=6, arrival=1.0)
    s.add_request(a)
    s.add_request(b)
    out, _ = step(s, dev)
    assert plan(out) == [("a", 0, 16), ("b", 0, 8)] and kv.blocks_of("b") == [5, 6]
    out, _ = step(s, dev)  # a's 17th slot needs a new block: b (latest arrival) is preempted
    assert out.preempted == [b] and b.status == RequestStatus.PREEMPTED
    # b's blocks were freed tail first, so a's new block evicted b's tail (6); b's head stays cached.
    assert kv.blocks_of("a") == [1, 2, 3, 4, 6] and kv.pool.free_block_ids() == [5]
    assert kv.pool.get_cached_block(b.block_hashes[0]) == 5 and kv.pool.get_cached_block(b.block_hashes[1]) is None
    while b.status != RequestStatus.RUNNING:
        out, _ = step(s, dev)
    # b resumes (after a finished) with prompt + 1 output = 9 tokens and hits its own head block.
    assert a.is_finished and plan(out) == [("b", 4, 5)]
    assert kv.blocks_of("b") == [5, 6, 4]
    assert b.num_cached_tokens == 0  # reported for the first admission only, as vLLM
    assert (kv.prefix_cache_queries, kv.prefix_cache_hits) == (16 + 8 + 9, 4)
    while s.has_unfinished_requests():
        step(s, dev)
    assert kv.num_used_blocks == 0


def test_reset_prefix_cache_through_the_scheduler():
    s, kv, dev = make()
    s.add_request(req("a", PROMPT, max_tokens=2))
    step(s, dev)
    assert not s.reset_prefix_cache()  # a is running
    step(s, dev)
    assert s.reset_prefix_cache() and kv.pool.num_cached_blocks == 0
    s.add_request(req("b", PROMPT))
    out, _ = step(s, dev)
    assert plan(out) == [("b", 0, 14)]


# ------------------------------------------------------------------ property test

# Two prefixes that share their first 10 tokens, and a repetitive one; salts mostly absent.
PREFIXES = [list(range(10, 40)), list(range(10, 20)) + list(range(60, 80)), [5] * 30]
SALTS = [None, None, None, "t1", "t2"]
# ("add", prefix, prefix_len, suffix_len, salt, max_tokens, prompt_logprobs) | ("step", seed)
# | ("abort" | "finish", index) | ("reset",)
ADD = st.tuples(st.just("add"), st.integers(0, len(PREFIXES) - 1), st.integers(0, 24), st.integers(0, 6),
                st.integers(0, len(SALTS) - 1), st.integers(1, 8), st.booleans())
OPS = st.tuples(
    st.lists(ADD, min_size=2, max_size=6),
    st.lists(
        st.one_of(
            ADD,
            ADD,
            st.tuples(st.just("step"), st.integers(0, 2**31 - 1)),
            st.tuples(st.just("step"), st.integers(0, 2**31 - 1)),
            st.tuples(st.just("abort"), st.integers(0, 30)),
            st.tuples(st.just("finish"), st.integers(0, 30)),
            st.tuples(st.just("reset")),
        ),
        max_size=40,
    ),
).map(lambda t: t[0] + t[1])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    ops=OPS,
    cache_tokens=st.integers(8, 32),  # small, so preemption and eviction are common
    block_size=st.sampled_from([1, 2, 4]),
    max_num_seqs=st.integers(1, 5),
    budget=st.integers(1, 24),
    policy=st.sampled_from(["fcfs", "priority", "sjf", "static"]),
    chunked=st.booleans(),
    mode=st.sampled_from(["recompute", "swap"]),
    cpu_tokens=st.integers(0, 40),  # host swap pool; small ones make swaps fall back to recompute
)
def test_random_shared_prefixes_read_correct_kv_and_leak_nothing(ops, cache_tokens, block_size, max_num_seqs,
                                                                 budget, policy, chunked, mode, cpu_tokens):
    s, stats = drive(ops, cache_tokens, block_size, max_num_seqs, budget, policy, chunked, mode, cpu_tokens)
    event(f"preempted: {s.num_preemptions > 0}")
    event(f"hit: {stats['hits'] > 0}")
    event(f"swapped in: {s.num_swap_ins > 0}")


def test_seeded_sweep_hits_preempts_and_resumes_from_cache():
    # Hypothesis explores edge cases; this sweep makes sure hits, preemption and resumed requests
    # hitting the cache all happen many times.
    rng = random.Random(4321)
    totals = {"preempting": 0, "hits": 0, "resume_hits": 0, "swap_ins": 0, "fallbacks": 0}

    def add():
        return ("add", rng.randrange(len(PREFIXES)), rng.randint(0, 20), rng.randint(0, 6),
                rng.randrange(len(SALTS)), rng.randint(1, 8), rng.random() < 0.1)

    for _ in range(100):
        ops = [add() for _ in range(rng.randint(2, 8))]
        for _ in range(rng.randint(0, 30)):
            kind = rng.choice(["add", "step", "step", "step", "abort", "finish", "reset"])
            ops.append(add() if kind == "add" else (kind, rng.randint(0, 2**31 - 1)))
        s, stats = drive(ops, rng.randint(8, 40), rng.choice([1, 2, 4]), rng.randint(2, 5),
                         rng.randint(1, 24), rng.choice(["fcfs", "priority", "sjf", "static"]), rng.random() < 0.7,
                         rng.choice(["recompute", "swap", "swap"]), rng.choice([0, 4, 16, 40]))
        totals["preempting"] += s.num_preemptions > 0
        totals["hits"] += stats["hits"] > 0
        totals["resume_hits"] += stats["resume_hits"] > 0
        totals["swap_ins"] += s.num_swap_ins > 0
        totals["fallbacks"] += s.num_swap_fallbacks > 0
    assert totals["preempting"] >= 20 and totals["hits"] >= 50 and totals["resume_hits"] >= 5, totals
    assert totals["swap_ins"] >= 10 and totals["fallbacks"] >= 3, totals


def drive(ops, cache_tokens, block_size, max_num_seqs, budget, policy, chunked, mode="recompute", cpu_tokens=0):
    """Run ops on a fresh scheduler + fake device, checking after every step; then drain.
    With mode="swap" the fake device also copies blocks to and from its host pool."""
    s, kv = make_scheduler(cache_tokens, block_size, max_num_seqs, budget, policy, chunked, max_model_len=40,
                           preemption_mode=mode, cpu_tokens=cpu_tokens)
    budget, num_blocks = s.max_num_batched_tokens, kv.num_blocks
    dev = FakeDevice(kv)
    added: list[Request] = []
    rng = random.Random(0)
    stats = {"hits": 0, "resume_hits": 0}

    def do_step():
        waiting_before = {r.request_id: r.num_preemptions for r in s.waiting}
        hits_before = kv.prefix_cache_hits
        out = s.schedule()
        assert out.num_batched_tokens == sum(x.num_new_tokens for x in out.scheduled) <= budget
        for x in out.scheduled:
            r = x.request
            assert r.status == RequestStatus.RUNNING and x.num_new_tokens >= 1
            assert x.samples == (r.num_computed_tokens + x.num_new_tokens == r.num_tokens)
            assert len(kv.blocks_of(r.request_id)) * block_size >= r.num_computed_tokens + x.num_new_tokens
            if r.request_id in waiting_before and waiting_before[r.request_id] and x.num_computed_tokens:
                stats["resume_hits"] += 1
        stats["hits"] += kv.prefix_cache_hits > hits_before
        for r in s.waiting:
            assert not kv.has_blocks(r.request_id)
            if r.status == RequestStatus.SWAPPED:  # keeps its computed tokens, in host blocks
                assert len(kv.cpu_blocks_of(r.request_id)) == cdiv(r.num_computed_tokens, block_size) > 0
            else:
                assert r.num_computed_tokens == 0 and not kv.is_swapped(r.request_id)
        # Host destinations and swapped-in device blocks are fresh: no block is written twice.
        assert len({c for _, c in out.blocks_to_swap_out}) == len(out.blocks_to_swap_out)
        assert len({g for _, g in out.blocks_to_swap_in}) == len(out.blocks_to_swap_in)
        dev.execute(out)
        sampled = {x.request_id: rng.choice([EOS, 7, 8, 9, 10, 11, 12]) for x in out.scheduled if x.samples}
        for r in s.update(out, sampled):
            assert r.is_finished and not kv.has_blocks(r.request_id)
        kv.check_invariants()
        dev.check_cached_blocks(added)

    for op in ops:
        kind = op[0]
        if kind == "add":
            _, p, n_prefix, n_suffix, salt, max_tokens, prompt_lp = op
            tokens = PREFIXES[p][:n_prefix] + [100 + len(added)] * n_suffix
            if not tokens:
                tokens = [3]
            r = Request(f"r{len(added)}", tokens, SamplingParams(
                max_tokens=max_tokens, prompt_logprobs=1 if prompt_lp else None),
                eos_token_ids=(EOS,), arrival_time=float(len(added)), cache_salt=SALTS[salt])
            try:
                s.add_request(r)
            except ValueError:
                assert cdiv(len(tokens), block_size) > num_blocks - 1
                continue
            added.append(r)
        elif kind == "step":
            rng.seed(op[1])
            do_step()
        elif kind == "reset":
            held = kv.num_used_blocks
            assert s.reset_prefix_cache() == (held == 0)
            assert held or kv.pool.num_cached_blocks == 0
            kv.check_invariants()
        elif added:
            end_request(s, added, kind, op[1])
            kv.check_invariants()

    drain(s, do_step, added)
    assert kv.num_used_blocks == 0 and not kv.ref_counts.any()
    assert kv.num_free_blocks == kv.num_usable_blocks
    assert kv.num_free_cpu_blocks == kv.num_cpu_blocks
    assert s.num_blocks_swapped_in <= s.num_blocks_swapped_out
    return s, stats
