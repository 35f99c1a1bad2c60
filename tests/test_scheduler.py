"""Scheduler + KVCacheManager without a device: exact plans, preemption, stops, and a property test."""

import random

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from jaxllm.core.kv_cache import KVCacheManager, cdiv
from jaxllm.core.scheduler import Scheduler
from jaxllm.request import Request, RequestStatus
from jaxllm.sampling_params import SamplingParams
from tests.helpers.sched_ops import drain, end_request, make_scheduler

EOS = 2


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def make(num_blocks=64, block_size=4, max_num_seqs=4, max_num_batched_tokens=16, max_model_len=64,
         policy="fcfs", chunked=True, caching=False):
    # Prefix caching is off by default here: req() gives every prompt the same leading tokens, and
    # these exact plans are about budgets and preemption; tests/test_prefix_caching.py covers hits.
    bm = KVCacheManager(num_blocks, block_size, max_num_seqs, cdiv(max_model_len, block_size),
                        enable_caching=caching)
    clock = FakeClock()
    s = Scheduler(bm, policy, max_num_seqs, max_num_batched_tokens, max_model_len,
                  enable_chunked_prefill=chunked, clock=clock)
    return s, bm, clock


def req(rid, n_prompt, max_tokens=4, arrival=0.0, priority=0, **sp):
    return Request(rid, list(range(100, 100 + n_prompt)), SamplingParams(max_tokens=max_tokens, **sp),
                   eos_token_ids=(EOS,), arrival_time=arrival, priority=priority)


def step(s, tokens=None, default=7):
    """One schedule + update, sampling `default` unless tokens[rid] says otherwise."""
    tokens = tokens or {}
    out = s.schedule()
    sampled = {x.request_id: tokens.get(x.request_id, default) for x in s_samples(out)}
    finished = s.update(out, sampled)
    s.kv_cache_manager.check_invariants()
    return out, finished


def s_samples(out):
    return [x for x in out.scheduled if x.samples]


def plan(out):
    return [(x.request_id, x.num_new_tokens, x.samples) for x in out.scheduled]


# ------------------------------------------------------------------ chunking and batching


def test_chunked_prefill_splits_long_prompt_exactly():
    s, bm, _ = make(max_num_batched_tokens=16)
    r = req("a", 40, max_tokens=3)
    s.add_request(r)
    out, _ = step(s)
    assert plan(out) == [("a", 16, False)] and out.num_batched_tokens == 16
    assert r.num_computed_tokens == 16 and r.output_token_ids == [] and len(bm.blocks_of("a")) == 4
    out, _ = step(s)
    assert plan(out) == [("a", 16, False)] and r.num_computed_tokens == 32
    out, _ = step(s)
    assert plan(out) == [("a", 8, True)] and r.num_computed_tokens == 40 and r.output_token_ids == [7]
    assert len(bm.blocks_of("a")) == 10
    out, _ = step(s)
    assert plan(out) == [("a", 1, True)]  # feeds the sampled token: slot 41 -> an 11th block
    assert len(bm.blocks_of("a")) == 11 and out.scheduled[0].token_ids == [7]
    out, fin = step(s)
    assert fin == [r] and r.finish_reason == "length" and r.output_token_ids == [7, 7, 7]
    assert bm.num_used_blocks == 0 and not s.has_unfinished_requests()


def test_scheduled_token_ids_follow_computed_tokens():
    s, _, _ = make(max_num_batched_tokens=5)
    r = req("a", 7)
    s.add_request(r)
    out = s.schedule()
    assert out.scheduled[0].token_ids == list(range(100, 105)) and out.scheduled[0].num_computed_tokens == 0
    s.update(out, {})
    out = s.schedule()
    assert out.scheduled[0].token_ids == [105, 106] and out.scheduled[0].num_computed_tokens == 5


def test_mixed_prefill_and_decode_in_one_step():
    s, _, _ = make(max_num_batched_tokens=16)
    a = req("a", 6, max_tokens=10)
    s.add_request(a)
    assert plan(step(s)[0]) == [("a", 6, True)]
    s.add_request(req("b", 20, arrival=1.0))
    s.add_request(req("c", 3, arrival=2.0))
    out, _ = step(s)
    # running decode first, then the new prompt takes the rest of the budget; c waits (head-of-line)
    assert plan(out) == [("a", 1, True), ("b", 15, False)]
    out, _ = step(s)
    assert plan(out) == [("a", 1, True), ("b", 5, True), ("c", 3, True)]
    assert out.num_batched_tokens == 9


def test_no_chunking_waits_for_whole_prompt_head_of_line():
    s, _, _ = make(max_num_batched_tokens=64, max_model_len=64, chunked=False)
    s.add_request(req("a", 30, max_tokens=5))
    s.add_request(req("b", 40, arrival=1.0))
    s.add_request(req("c", 2, arrival=2.0))
    out, _ = step(s)
    assert plan(out) == [("a", 30, True)]  # b does not fit the rest (34); c must not overtake it
    out, _ = step(s)
    assert plan(out) == [("a", 1, True), ("b", 40, True), ("c", 2, True)]
    with pytest.raises(ValueError, match="chunked prefill"):
        make(max_num_batched_tokens=32, max_model_len=64, chunked=False)


def test_max_num_seqs_limits_seats():
    s, _, _ = make(max_num_seqs=2, max_num_batched_tokens=100)
    for i in range(4):
        s.add_request(req(f"r{i}", 3, max_tokens=2, arrival=float(i)))
    out, _ = step(s)
    assert [x.request_id for x in out.scheduled] == ["r0", "r1"] and s.num_waiting == 2
    out, fin = step(s)
    assert {r.request_id for r in fin} == {"r0", "r1"}
    out, _ = step(s)
    assert [x.request_id for x in out.scheduled] == ["r2", "r3"]


# ------------------------------------------------------------------ preemption


def test_preemption_when_blocks_run_out_and_recompute():
    # 4 usable blocks of 4 slots; two 8-token prompts fill them.
    s, bm, _ = make(num_blocks=5, max_num_batched_tokens=32, max_model_len=16)
    a, b = req("a", 8, max_tokens=3), req("b", 8, max_tokens=3, arrival=1.0)
    s.add_request(a)
    s.add_request(b)
    out, _ = step(s)
    assert plan(out) == [("a", 8, True), ("b", 8, True)] and bm.num_free_blocks == 0
    out, _ = step(s, {"a": 11})
    # a needs a 3rd block for slot 9: FCFS preempts the latest arrival, b, which is not re-admitted
    assert plan(out) == [("a", 1, True)] and out.preempted == [b]
    assert b.status == RequestStatus.PREEMPTED and b.num_computed_tokens == 0 and b.num_preemptions == 1
    assert b.output_token_ids == [7] and not bm.has_blocks("b") and s.waiting[0] is b
    assert s.num_preemptions == 1 and b.metrics.num_preemptions == 1
    out, fin = step(s, {"a": 12})
    assert plan(out) == [("a", 1, True)] and fin == [a]  # b needs 3 blocks, 1 free: waits
    assert a.output_token_ids == [7, 11, 12]
    out, _ = step(s, {"b": 21})
    assert plan(out) == [("b", 9, True)]  # prompt + its first output, recomputed
    assert b.status == RequestStatus.RUNNING and b.output_token_ids == [7, 21]
    out, fin = step(s, {"b": 22})
    assert plan(out) == [("b", 1, True)] and fin == [b] and b.output_token_ids == [7, 21, 22]
    assert s.num_preemptions == 1 and bm.num_used_blocks == 0


def test_requester_can_be_its_own_victim():
    # 3 usable blocks. a (prio 0) holds 2, b (prio 1) holds 1; b needs a 2nd block first.
    s, bm, _ = make(num_blocks=4, max_num_batched_tokens=32, max_model_len=16, policy="priority")
    a, b = req("a", 7, max_tokens=5, priority=0), req("b", 4, max_tokens=5, priority=1)
    s.add_request(b)
    s.add_request(a)
    out, _ = step(s)
    assert plan(out) == [("a", 7, True), ("b", 4, True)]  # priority order
    out, _ = step(s)
    assert plan(out) == [("a", 1, True)] and out.preempted == [b]
    assert bm.blocks_of("a") == [1, 2] and bm.num_free_blocks == 1


def test_priority_preemption_unschedules_an_already_scheduled_victim():
    s, bm, clock = make(num_blocks=4, max_num_batched_tokens=32, max_model_len=16, policy="priority")
    b = req("b", 2, max_tokens=8, priority=5)
    s.add_request(b)
    step(s)  # b: 2 tokens, 1 block
    a = req("a", 8, max_tokens=8, priority=0, arrival=1.0)
    s.add_request(a)
    out, _ = step(s)
    assert plan(out) == [("b", 1, True), ("a", 8, True)] and bm.num_free_blocks == 0
    out, _ = step(s)
    # b (scheduled first: running order) is the lowest priority: it is unscheduled, its budget refunded
    assert plan(out) == [("a", 1, True)] and out.preempted == [b] and out.num_batched_tokens == 1
    assert b.num_computed_tokens == 0 and b.output_token_ids == [7, 7]


def test_alone_past_cache_capacity_finishes_with_length():
    # 2 usable blocks = 8 slots; a 6-token prompt can hold 3 outputs (the 3rd is never fed).
    s, bm, _ = make(num_blocks=3, max_num_batched_tokens=16, max_model_len=16)
    r = req("a", 6, max_tokens=10)
    s.add_request(r)
    for _ in range(3):
        step(s)
    assert r.output_token_ids == [7, 7, 7] and r.num_computed_tokens == 8
    out = s.schedule()
    assert out.scheduled == [] and out.finished == [r] and out.preempted == []
    assert r.status == RequestStatus.FINISHED_LENGTH and r.finish_reason == "length"
    assert s.update(out, {}) == [r]  # handed back by update too
    assert bm.num_used_blocks == 0 and not s.has_unfinished_requests()


# ------------------------------------------------------------------ policies through the scheduler


def test_fcfs_admits_in_arrival_order():
    s, _, _ = make(max_num_seqs=2)
    s.add_request(req("late", 3, arrival=5.0))
    s.add_request(req("early", 3, arrival=1.0))
    s.add_request(req("mid", 3, arrival=3.0))
    out, _ = step(s)
    assert [x.request_id for x in out.scheduled] == ["early", "mid"]


def test_priority_and_sjf_admission_order():
    s, _, _ = make(max_num_seqs=4, max_num_batched_tokens=100, policy="priority")
    for rid, prio, t in [("p2", 2, 0.0), ("p0b", 0, 2.0), ("p1", 1, 1.0), ("p0a", 0, 3.0)]:
        s.add_request(req(rid, 3, priority=prio, arrival=t))
    out, _ = step(s)
    assert [x.request_id for x in out.scheduled] == ["p0b", "p0a", "p1", "p2"]

    s, _, _ = make(max_num_seqs=4, max_num_batched_tokens=100, policy="sjf")
    for rid, n, t in [("long", 20, 0.0), ("short", 2, 1.0), ("mid", 9, 2.0), ("short2", 2, 3.0)]:
        s.add_request(req(rid, n, arrival=t))
    out, _ = step(s)
    assert [x.request_id for x in out.scheduled] == ["short", "short2", "mid", "long"]


def test_static_policy_drains_before_admitting():
    def run(policy):
        s, _, _ = make(max_num_seqs=2, policy=policy)
        s.add_request(req("a", 3, max_tokens=1, arrival=0.0))
        s.add_request(req("b", 3, max_tokens=4, arrival=1.0))
        s.add_request(req("c", 3, max_tokens=1, arrival=2.0))
        return [[x.request_id for x in step(s)[0].scheduled] for _ in range(6)]

    assert run("static") == [["a", "b"], ["b"], ["b"], ["b"], ["c"], []]
    assert run("fcfs") == [["a", "b"], ["b", "c"], ["b"], ["b"], [], []]


# ------------------------------------------------------------------ stops, aborts, errors


def test_stop_conditions():
    s, _, _ = make(max_num_seqs=6, max_num_batched_tokens=100, max_model_len=32)
    rs = {
        "eos": req("eos", 3, max_tokens=9),
        "stoptok": req("stoptok", 3, max_tokens=9, stop_token_ids=[50]),
        "min": req("min", 3, max_tokens=9, min_tokens=2),
        "ignore": req("ignore", 3, max_tokens=2, ignore_eos=True),
        "eos_at_max": req("eos_at_max", 3, max_tokens=1),
        "len": req("len", 30, max_tokens=9),  # 30 + 2 outputs reach max_model_len=32
    }
    for r in rs.values():
        s.add_request(r)
    toks = {"eos": EOS, "stoptok": 50, "min": EOS, "ignore": EOS, "eos_at_max": EOS, "len": EOS + 1}
    _, fin = step(s, toks)
    assert {r.request_id for r in fin} == {"eos", "stoptok", "eos_at_max"}
    assert (rs["eos"].finish_reason, rs["eos"].stop_reason, rs["eos"].status) == ("stop", None, RequestStatus.FINISHED_STOPPED)
    assert (rs["stoptok"].finish_reason, rs["stoptok"].stop_reason) == ("stop", 50)
    assert rs["eos_at_max"].finish_reason == "stop"  # a natural stop wins over the length cap
    _, fin = step(s, toks)
    assert {r.request_id for r in fin} == {"min", "ignore", "len"}
    assert rs["min"].finish_reason == "stop" and rs["min"].output_token_ids == [EOS, EOS]
    assert rs["ignore"].finish_reason == "length" and rs["ignore"].output_token_ids == [EOS, EOS]
    assert rs["len"].finish_reason == "length" and rs["len"].num_tokens == 32
    assert all(r.finished_time is not None for r in rs.values())


def test_abort_waiting_and_running():
    s, bm, _ = make(max_num_seqs=1)
    a, b = req("a", 5), req("b", 5, arrival=1.0)
    s.add_request(a)
    s.add_request(b)
    step(s)
    assert s.abort_request("b") is b and b.status == RequestStatus.FINISHED_ABORTED and b.finish_reason == "abort"
    assert s.abort_request("a") is a and not bm.has_blocks("a") and bm.num_used_blocks == 0
    assert s.abort_request("a") is None and s.abort_request("nope") is None
    assert not s.has_unfinished_requests()
    bm.check_invariants()


def test_abort_between_schedule_and_update_and_errors_leave_others_alone():
    s, bm, _ = make()
    a, b, c = req("a", 4), req("b", 4, arrival=1.0), req("c", 4, arrival=2.0)
    for r in (a, b, c):
        s.add_request(r)
    out = s.schedule()
    s.abort_request("a")
    s.finish_request("b", RequestStatus.FINISHED_ERROR, error="model produced NaN")
    fin = s.update(out, {"a": 7, "b": 7, "c": 7})
    assert fin == [] and a.output_token_ids == [] and b.output_token_ids == []
    assert b.finish_reason == "error" and b.error == "model produced NaN"
    assert c.output_token_ids == [7] and c.num_computed_tokens == 4 and s.num_running == 1
    out = s.schedule()
    assert plan(out) == [("c", 1, True)]
    fin = s.update(out, {})  # no token for c: c errors out
    assert fin == [c] and c.status == RequestStatus.FINISHED_ERROR
    bm.check_invariants()
    assert bm.num_used_blocks == 0
    with pytest.raises(ValueError, match="FINISHED"):
        s.finish_request("x", RequestStatus.RUNNING)


def test_engine_finish_with_stop_string():
    s, bm, _ = make()
    r = req("a", 4, max_tokens=9)
    s.add_request(r)
    step(s)
    assert s.finish_request("a", RequestStatus.FINISHED_STOPPED, "stop", "###") is r
    assert (r.finish_reason, r.stop_reason, r.is_finished) == ("stop", "###", True)
    assert bm.num_used_blocks == 0 and s.num_running == 0


def test_add_request_validation():
    s, _, _ = make(num_blocks=3, max_model_len=16)  # 2 usable blocks = 8 slots
    s.add_request(req("ok", 8))
    with pytest.raises(ValueError, match="already"):
        s.add_request(req("ok", 3))
    with pytest.raises(ValueError, match="empty"):
        s.add_request(req("e", 0))
    with pytest.raises(ValueError, match="max_model_len"):
        s.add_request(req("long", 17))
    with pytest.raises(ValueError, match="blocks"):
        s.add_request(req("big", 9))


def test_metrics_timings():
    s, _, clock = make(max_num_batched_tokens=4)
    clock.t = 1.0
    r = req("a", 6, max_tokens=3, arrival=0.5)
    s.add_request(r)
    clock.t = 2.0
    out = s.schedule()
    s.update(out, {}, now=2.5)
    assert r.first_scheduled_time == 2.0 and r.first_token_time is None
    for t in (3.0, 4.0, 6.0):
        clock.t = t
        step(s)
    m = r.metrics
    assert (m.first_token_time, m.last_token_time, m.finished_time) == (3.0, 6.0, 6.0)
    assert m.ttft == pytest.approx(2.5) and m.mean_tpot == pytest.approx(1.5)
    assert m.queue_time == pytest.approx(1.5) and m.e2e_latency == pytest.approx(5.5)
    assert m.num_output_tokens == 3 and m.num_prompt_tokens == 6
    assert m.token_times == [3.0, 4.0, 6.0] and m.inter_token_latencies == [1.0, 2.0]


# ------------------------------------------------------------------ property test

# ("add", prompt_len, max_tokens, priority, min_tokens) | ("step", seed) | ("abort"|"finish", index)
ADD = st.tuples(st.just("add"), st.integers(1, 20), st.integers(1, 12), st.integers(0, 3), st.integers(0, 2))
OPS = st.tuples(
    st.lists(ADD, min_size=1, max_size=6),  # start with some requests, so most examples do work
    st.lists(
        st.one_of(
            ADD,
            st.tuples(st.just("step"), st.integers(0, 2**31 - 1)),
            st.tuples(st.just("step"), st.integers(0, 2**31 - 1)),
            st.tuples(st.just("abort"), st.integers(0, 30)),
            st.tuples(st.just("finish"), st.integers(0, 30)),
        ),
        max_size=40,
    ),
).map(lambda t: t[0] + t[1])


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    ops=OPS,
    cache_tokens=st.integers(8, 32),  # KV capacity; small, so preemption is common
    block_size=st.sampled_from([1, 2, 4]),
    max_num_seqs=st.integers(1, 5),
    budget=st.integers(1, 20),
    policy=st.sampled_from(["fcfs", "priority", "sjf", "static"]),
    chunked=st.booleans(),
)
def test_random_operations_keep_invariants_and_terminate(ops, cache_tokens, block_size, max_num_seqs, budget,
                                                         policy, chunked):
    s = drive(ops, cache_tokens, block_size, max_num_seqs, budget, policy, chunked)
    event(f"preempted: {s.num_preemptions > 0}")


def test_seeded_random_stress_with_frequent_preemption():
    # Hypothesis explores edge cases; this sweep makes sure the preemption paths run a lot.
    rng = random.Random(1234)
    preempting = 0
    for trial in range(150):
        ops = [("add", rng.randint(1, 20), rng.randint(1, 12), rng.randint(0, 3), rng.randint(0, 2))
               for _ in range(rng.randint(2, 8))]
        for _ in range(rng.randint(0, 30)):
            kind = rng.choice(["add", "step", "step", "step", "abort", "finish"])
            if kind == "add":
                ops.append(("add", rng.randint(1, 20), rng.randint(1, 12), rng.randint(0, 3), rng.randint(0, 2)))
            else:
                ops.append((kind, rng.randint(0, 2**31 - 1)))
        s = drive(ops, rng.randint(8, 24), rng.choice([1, 2, 4]), rng.randint(2, 5), rng.randint(1, 20),
                  rng.choice(["fcfs", "priority", "sjf", "static"]), rng.random() < 0.7)
        preempting += s.num_preemptions > 0
    assert preempting >= 30, preempting


def drive(ops, cache_tokens, block_size, max_num_seqs, budget, policy, chunked):
    """Run ops on a fresh scheduler, checking invariants after every step; then drain to the end."""
    max_model_len = 24
    s, bm = make_scheduler(cache_tokens, block_size, max_num_seqs, budget, policy, chunked, max_model_len)
    budget, num_blocks = s.max_num_batched_tokens, bm.num_blocks
    added: list[Request] = []
    rng = random.Random(0)

    def do_step():
        out = s.schedule()
        assert out.num_batched_tokens == sum(x.num_new_tokens for x in out.scheduled) <= budget
        assert len(out.scheduled) <= max_num_seqs and s.num_running <= max_num_seqs
        ids = [x.request_id for x in out.scheduled]
        assert len(set(ids)) == len(ids)
        for x in out.scheduled:
            r = x.request
            assert r.status == RequestStatus.RUNNING and x.num_new_tokens >= 1
            assert x.num_computed_tokens == r.num_computed_tokens
            assert x.samples == (r.num_computed_tokens + x.num_new_tokens == r.num_tokens)
            assert r.num_computed_tokens + x.num_new_tokens <= r.num_tokens <= max_model_len
            assert len(bm.blocks_of(r.request_id)) * block_size >= r.num_computed_tokens + x.num_new_tokens
            if not chunked:
                assert x.samples
        for r in s.waiting:
            assert not bm.has_blocks(r.request_id) and r.num_computed_tokens == 0
        for r in s.running:
            assert bm.has_blocks(r.request_id)
        # tokens from a small vocabulary that includes EOS and a stop token
        sampled = {x.request_id: rng.choice([EOS, 5] + [7, 8, 9, 10] * 8) for x in out.scheduled if x.samples}
        finished = s.update(out, sampled)
        for r in finished:
            assert r.is_finished and not bm.has_blocks(r.request_id)
        bm.check_invariants()

    for op in ops:
        kind = op[0]
        if kind == "add":
            _, n, max_tokens, prio, min_tokens = op
            r = Request(f"r{len(added)}", [11] * n, SamplingParams(max_tokens=max_tokens,
                        min_tokens=min(min_tokens, max_tokens), stop_token_ids=[5]),
                        eos_token_ids=(EOS,), arrival_time=float(len(added)), priority=prio)
            try:
                s.add_request(r)
            except ValueError:
                assert cdiv(n, block_size) > num_blocks - 1
                continue
            added.append(r)
        elif kind == "step":
            rng.seed(op[1])
            do_step()
        elif added:
            end_request(s, added, kind, op[1])
            bm.check_invariants()

    drain(s, do_step, added)
    assert bm.num_used_blocks == 0
    return s


def test_preempt_all_running_keeps_the_admission_order():
    # The engine calls this when a failed step consumed the KV cache: every running request
    # recomputes, oldest first, ahead of the requests that were already waiting.
    s, bm, _ = make(num_blocks=64, max_num_seqs=2, max_num_batched_tokens=32)
    a, b, c = req("a", 5), req("b", 6, arrival=1.0), req("c", 3, arrival=2.0)
    for r in (a, b, c):
        s.add_request(r)
    step(s)
    assert [r.request_id for r in s.running] == ["a", "b"]
    s.preempt_all_running()
    assert not s.running and bm.num_used_blocks == 0 and s.num_preemptions == 2
    assert [r.request_id for r in s.waiting] == ["a", "b", "c"]
    assert all(r.status == RequestStatus.PREEMPTED and r.num_computed_tokens == 0 for r in (a, b))
    out, _ = step(s)
    assert plan(out) == [("a", 6, True), ("b", 7, True)]  # prompt + first output, recomputed
    bm.check_invariants()


def test_token_slice_equals_slicing_all_tokens():
    r = req("slice", 5)
    r.output_token_ids.extend([90, 91, 92])
    every = r.all_token_ids
    for start in range(len(every) + 1):
        for stop in range(start, len(every) + 2):
            assert r.token_slice(start, stop) == every[start:stop]
