"""Scheduling policies in isolation, get_policy, and the docstring's worked example."""

import re
import textwrap

import pytest

from jaxllm.core import policies
from jaxllm.core.kv_cache import KVCacheManager
from jaxllm.core.policies import (
    FCFSPolicy,
    PriorityPolicy,
    SchedulingPolicy,
    SJFPolicy,
    StaticBatchPolicy,
    get_policy,
    register_policy,
)
from jaxllm.core.scheduler import Scheduler
from jaxllm.request import Request
from jaxllm.sampling_params import SamplingParams


def req(rid, n=4, arrival=0.0, priority=0):
    return Request(rid, [1] * n, SamplingParams(max_tokens=4), arrival_time=arrival, priority=priority)


def ids(rs):
    return [r.request_id for r in rs]


def test_base_policy_defaults():
    p = SchedulingPolicy()
    rs = [req("b", arrival=2.0), req("a", arrival=1.0)]
    assert ids(p.order_waiting(rs, now=0.0)) == ["b", "a"]  # queue order kept
    assert p.can_admit(rs[0], rs[1:])
    assert p.choose_victim(rs).request_id == "a"  # last admitted


def test_fcfs():
    p = FCFSPolicy()
    rs = [req("c", arrival=3.0), req("a", arrival=1.0), req("b1", arrival=2.0), req("b2", arrival=2.0)]
    assert ids(p.order_waiting(rs, now=9.0)) == ["a", "b1", "b2", "c"]
    assert p.choose_victim(rs).request_id == "c"
    tie = [req("x", arrival=1.0), req("y", arrival=1.0)]
    assert p.choose_victim(tie).request_id == "y"  # ties: last admitted


def test_priority():
    p = PriorityPolicy()
    rs = [req("p1", arrival=0.0, priority=1), req("p0late", arrival=5.0, priority=0),
          req("p0early", arrival=4.0, priority=0), req("p3", arrival=1.0, priority=3),
          req("p3late", arrival=2.0, priority=3)]
    assert ids(p.order_waiting(rs, now=9.0)) == ["p0early", "p0late", "p1", "p3", "p3late"]
    assert p.choose_victim(rs).request_id == "p3late"  # worst priority, then latest arrival
    assert p.choose_victim(rs[:3]).request_id == "p1"


def test_sjf():
    p = SJFPolicy()
    rs = [req("long", 30, arrival=0.0), req("s2", 2, arrival=2.0), req("s1", 2, arrival=1.0), req("m", 10, arrival=3.0)]
    assert ids(p.order_waiting(rs, now=0.0)) == ["s1", "s2", "m", "long"]
    assert p.choose_victim(rs).request_id == "m"  # latest arrival


def test_static_batch_admission_window():
    p = StaticBatchPolicy()
    a, b = req("a"), req("b")
    p.begin_admission([], now=0.0)
    assert p.can_admit(a, []) and p.can_admit(b, [a])  # the batch is forming this step
    p.begin_admission([a, b], now=1.0)
    assert not p.can_admit(req("c"), [a, b])
    p.begin_admission([], now=2.0)
    assert p.can_admit(req("c"), [])


def test_get_policy():
    assert isinstance(get_policy(None), FCFSPolicy)
    assert isinstance(get_policy("fcfs"), FCFSPolicy)
    assert isinstance(get_policy("Priority"), PriorityPolicy)
    assert isinstance(get_policy("sjf"), SJFPolicy)
    assert isinstance(get_policy(StaticBatchPolicy), StaticBatchPolicy)
    inst = PriorityPolicy()
    assert get_policy(inst) is inst
    assert get_policy("static") is not get_policy("static")  # stateful: fresh per scheduler
    with pytest.raises(ValueError, match=r"'lifo'.*fcfs, priority, sjf, static"):
        get_policy("lifo")
    with pytest.raises(ValueError, match="unknown scheduling policy"):
        get_policy(42)


def test_docstring_example_runs_and_ages():
    # Execute the worked example from the module docstring, so the documentation cannot rot.
    block = re.search(r"\n(    from jaxllm.core.policies import SchedulingPolicy\n.*?)\n    # Scheduler", policies.__doc__, re.S)
    ns = {}
    exec(compile(textwrap.dedent(block.group(1)), "policies-docstring", "exec"), ns)
    Aging = ns["AgingPriorityPolicy"]
    p = Aging(aging_s=1.0)
    old_low = req("old_low", arrival=0.0, priority=3)
    new_high = req("new_high", arrival=9.0, priority=0)
    # waited 9.5 s: effective 3 - 9.5 beats 0 - 0.5
    assert ids(p.order_waiting([new_high, old_low], now=9.5)) == ["old_low", "new_high"]
    recent_low = req("recent_low", arrival=8.0, priority=3)  # waited 1.5 s: 1.5 > -0.5
    assert ids(p.order_waiting([recent_low, new_high], now=9.5)) == ["new_high", "recent_low"]
    assert p.choose_victim([new_high, old_low]).request_id == "old_low"

    # ...and it plugs into the scheduler by instance and, once registered, by name.
    register_policy("aging", Aging)
    try:
        bm = KVCacheManager(16, 4, 2, 4)
        s = Scheduler(bm, "aging", max_num_seqs=1, max_num_batched_tokens=16, max_model_len=16,
                      clock=lambda: 9.5)
        s.add_request(new_high)
        s.add_request(old_low)
        out = s.schedule()
        assert [x.request_id for x in out.scheduled] == ["old_low"]
    finally:
        policies.POLICIES.pop("aging")
    with pytest.raises(TypeError):
        register_policy("bad", object)


def test_docstring_swap_example_chooses_the_mode_per_victim():
    block = re.search(r"\n(    from jaxllm.core.policies import FCFSPolicy\n.*?)\n    # LLM\(model", policies.__doc__, re.S)
    ns = {}
    exec(compile(textwrap.dedent(block.group(1)), "policies-docstring-swap", "exec"), ns)
    p = ns["SwapLongPolicy"](min_swap_tokens=8)
    long_, short = req("long", 12), req("short", 4)
    long_.num_computed_tokens, short.num_computed_tokens = 12, 4
    assert p.preemption_mode(long_) == "swap" and p.preemption_mode(short) == "recompute"
    assert SchedulingPolicy().preemption_mode(long_) is None  # the engine's mode
    assert policies.policy_chooses_preemption_mode(p) and not policies.policy_chooses_preemption_mode("fcfs")
