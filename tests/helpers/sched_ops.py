"""Shared pieces of the scheduler property tests (tests/test_scheduler.py, test_prefix_caching.py):
ending a request the way a user or the engine would, and draining the scheduler to the end."""

from __future__ import annotations

from jaxllm.core.kv_cache import KVCacheManager, cdiv
from jaxllm.core.scheduler import Scheduler
from jaxllm.request import RequestStatus


def make_scheduler(cache_tokens, block_size, max_num_seqs, budget, policy, chunked, max_model_len,
                   preemption_mode="recompute", cpu_tokens=0):
    """(scheduler, its KVCacheManager) for a cache of about `cache_tokens` slots (plus the sink)
    and a host swap pool of about `cpu_tokens` slots (plus its scratch block; none for 0).
    Without chunked prefill the budget is raised to max_model_len, which the scheduler requires."""
    num_cpu_blocks = cdiv(cpu_tokens, block_size) + 1 if cpu_tokens else 0
    kv = KVCacheManager(cdiv(cache_tokens, block_size) + 1, block_size, max_num_seqs,
                        cdiv(max_model_len, block_size), num_cpu_blocks=num_cpu_blocks)
    if not chunked:
        budget = max(budget, max_model_len)
    s = Scheduler(kv, policy, max_num_seqs, budget, max_model_len, enable_chunked_prefill=chunked,
                  clock=lambda: 0.0, preemption_mode=preemption_mode)
    return s, kv


def end_request(s, added: list, kind: str, index: int) -> None:
    """"abort" or "finish" (engine-side stop string) the request added[index % len(added)]."""
    r = added[index % len(added)]
    if kind == "abort":
        s.abort_request(r.request_id)
    else:
        s.finish_request(r.request_id, RequestStatus.FINISHED_STOPPED, "stop", "</s>")


def drain(s, do_step, added: list) -> None:
    """Step until nothing is unfinished (within a generous bound); every request ended normally."""
    bound = 50 + 10 * sum(r.num_prompt_tokens + 8 for r in added)
    steps = 0
    while s.has_unfinished_requests():
        do_step()
        steps += 1
        assert steps <= bound, f"no termination after {steps} steps: {s.running} {list(s.waiting)}"
    assert all(r.is_finished for r in added)
    for r in added:
        assert r.finish_reason in ("stop", "length", "abort")
        if r.status == RequestStatus.FINISHED_LENGTH:
            assert r.num_output_tokens <= r.sampling_params.max_tokens
