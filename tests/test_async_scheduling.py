"""Async scheduling (EngineConfig.async_scheduling): the host schedules step N+1 while step N
runs, and every request's tokens equal a synchronous engine's: greedy with chunked prefill in
both compilation modes, EOS and stop-id stops at varied lengths (the row scheduled past a stop is
dropped), preemption in a small cache (those steps run synchronously), a mix of requests that
need their tokens on the host, aborts while a step is in flight. Steady state compiles nothing,
and the engine counts steps that really were scheduled before the previous step's tokens came.
"""

import collections

import numpy as np
import pytest

from jaxllm import LLM, SamplingParams
from jaxllm.engine import Engine
from jaxllm.config import CacheConfig, EngineConfig, ParallelConfig
from tests.helpers.tiny_models import make_tiny_model, random_prompt

VOCAB = 512
LENGTHS = [1, 2, 15, 16, 17, 33, 64, 100, 128, 150, 190, 220]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("async"), arch="llama", num_key_value_heads=2)


@pytest.fixture(scope="module")
def prompts():
    return [{"prompt_token_ids": random_prompt(n, VOCAB, seed=i)} for i, n in enumerate(LENGTHS)]


def _max_tokens(n: int, seed: int = 0) -> list[int]:
    return [int(m) for m in np.random.default_rng(seed).integers(1, 30, size=n)]


def _generate(model, prompts, params, *, async_scheduling: bool, **kwargs):
    """(outputs, stats, step records) of one fresh LLM."""
    kw = dict(num_kv_blocks=512, max_num_seqs=8, max_num_batched_tokens=64)
    kw.update(kwargs)
    llm = LLM(model, async_scheduling=async_scheduling, **kw)
    records = []
    llm.engine.add_step_observer(records.append)
    outs = llm.generate(prompts, params, use_tqdm=False)
    stats = llm.get_stats()
    assert stats["kv_blocks_used"] == 0, "finished requests must free their blocks"
    llm.engine.block_manager.check_invariants()
    assert llm.engine._in_flight_step is None, "an idle engine holds no step in flight"
    return outs, stats, records


def _completions(outs):
    return [[(c.token_ids, c.finish_reason) for c in o.outputs] for o in outs]


@pytest.mark.parametrize("compilation", ["layered", "fused"])
def test_greedy_chunked_prefill_matches_sync(model_dir, prompts, compilation):
    params = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True) for m in _max_tokens(len(prompts))]
    sync, sync_stats, _ = _generate(model_dir, prompts, params, async_scheduling=False, compilation=compilation)
    outs, stats, records = _generate(model_dir, prompts, params, async_scheduling=True, compilation=compilation)
    assert _completions(outs) == _completions(sync)
    assert stats["num_generated_tokens"] == sync_stats["num_generated_tokens"] == sum(p.max_tokens for p in params)
    assert stats["num_prompt_tokens_processed"] == sync_stats["num_prompt_tokens_processed"]
    # Overlap really happened, counted by the engine, and nothing needed a synchronous step.
    assert sync_stats["num_async_overlapped_steps"] == 0
    assert stats["num_async_overlapped_steps"] >= stats["num_steps"] - 2 > 0
    assert stats["num_async_sync_steps"] == 0
    assert sum(r.scheduled_in_flight for r in records) == stats["num_async_overlapped_steps"]
    assert any(r.host_time_overlapped > 0 for r in records)
    assert all(0 <= r.fetch_wait_time <= r.device_time + 1e-9 for r in records)
    assert all(r.host_time_overlapped <= r.host_time + 1e-9 for r in records)


@pytest.fixture(scope="module")
def eos_model(model_dir, prompts, tmp_path_factory):
    """The same weights with EOS set to the token greedy decoding produces most often after the
    first output, so requests stop on it at varied lengths."""
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    outs, _, _ = _generate(model_dir, prompts, params, async_scheduling=False)
    counts = collections.Counter(t for o in outs for t in o.outputs[0].token_ids[1:])
    frequent = [int(t) for t, _ in counts.most_common(4)]
    path = make_tiny_model(tmp_path_factory.mktemp("async_eos"), arch="llama", num_key_value_heads=2,
                           eos_token_id=frequent[0])
    return path, frequent[1:]


def test_eos_and_stop_ids_match_sync(eos_model, prompts):
    eos_model, stop_ids = eos_model
    mt = _max_tokens(len(prompts), seed=1)
    # Even requests stop at EOS, odd ones at either EOS or a stop id; max_tokens ends the rest.
    params = [SamplingParams(temperature=0.0, max_tokens=m + 10, stop_token_ids=stop_ids if i % 2 else None)
              for i, m in enumerate(mt)]
    sync, sync_stats, _ = _generate(eos_model, prompts, params, async_scheduling=False)
    outs, stats, _ = _generate(eos_model, prompts, params, async_scheduling=True)
    assert _completions(outs) == _completions(sync)
    reasons = collections.Counter(o.outputs[0].finish_reason for o in outs)
    assert reasons["stop"] >= 3 and reasons["length"] >= 1, reasons
    lengths = {len(o.outputs[0].token_ids) for o in outs if o.outputs[0].finish_reason == "stop"}
    assert len(lengths) >= 2, "stops at varied lengths"
    # The rows scheduled past a stop were dropped, not counted as generated tokens.
    assert stats["num_generated_tokens"] == sync_stats["num_generated_tokens"]
    assert stats["num_async_overlapped_steps"] > 0


@pytest.mark.parametrize("preemption_mode", ["recompute", "swap"])
def test_preemption_in_small_cache_falls_back(model_dir, prompts, preemption_mode):
    params = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True) for m in _max_tokens(len(prompts), 2)]
    kw = dict(num_kv_blocks=24, block_size=16, preemption_mode=preemption_mode, swap_space=0.01)
    sync, sync_stats, _ = _generate(model_dir, prompts, params, async_scheduling=False, **kw)
    outs, stats, _ = _generate(model_dir, prompts, params, async_scheduling=True, **kw)
    assert _completions(outs) == _completions(sync)
    assert sync_stats["num_preemptions"] > 0 and stats["num_preemptions"] > 0
    if preemption_mode == "swap":
        assert stats["num_swap_ins"] > 0 and stats["num_swap_ins"] == sync_stats["num_swap_ins"]
    assert stats["num_async_sync_steps"] > 0  # the cache was short enough to preempt
    assert stats["num_async_overlapped_steps"] > 0  # and steps overlapped while it was not


def test_mix_needing_host_tokens_matches_sync(model_dir, prompts):
    """Seeded sampling and min_tokens run overlapped (their RNG step and mask count in-flight
    tokens); logprobs, prompt logprobs, penalties and n > 1 make their steps synchronous."""
    kinds = [
        # These two outlive the others, so their last steps overlap again.
        SamplingParams(temperature=0.0, max_tokens=60, ignore_eos=True),
        SamplingParams(temperature=0.8, top_p=0.9, seed=5, max_tokens=50, ignore_eos=True),
        SamplingParams(temperature=1.0, top_k=20, max_tokens=9, min_tokens=4),
        SamplingParams(temperature=0.0, logprobs=3, max_tokens=6),
        SamplingParams(temperature=0.0, prompt_logprobs=2, max_tokens=4),
        SamplingParams(temperature=0.7, repetition_penalty=1.3, frequency_penalty=0.2, seed=1, max_tokens=10),
        SamplingParams(temperature=0.9, n=2, seed=3, max_tokens=7),
    ]
    params = [kinds[i % len(kinds)] for i in range(len(prompts))]
    sync, _, _ = _generate(model_dir, prompts, params, async_scheduling=False)
    outs, stats, _ = _generate(model_dir, prompts, params, async_scheduling=True)
    assert _completions(outs) == _completions(sync)
    for a, b in zip(outs, sync):
        for ca, cb in zip(a.outputs, b.outputs):
            if cb.logprobs is not None:
                assert [sorted(d) for d in ca.logprobs] == [sorted(d) for d in cb.logprobs]
                got = [[lp.logprob for lp in d.values()] for d in ca.logprobs]
                want = [[lp.logprob for lp in d.values()] for d in cb.logprobs]
                np.testing.assert_allclose(np.concatenate(got), np.concatenate(want), rtol=1e-5, atol=1e-6)
        if b.prompt_logprobs is not None:
            assert len(a.prompt_logprobs) == len(b.prompt_logprobs)
    assert stats["num_async_sync_steps"] > 0 and stats["num_async_overlapped_steps"] > 0

    # Alone, the requests that need no host tokens never wait.
    plain = [kinds[i % 3] for i in range(len(prompts))]
    sync, _, _ = _generate(model_dir, prompts, plain, async_scheduling=False)
    outs, stats, _ = _generate(model_dir, prompts, plain, async_scheduling=True)
    assert _completions(outs) == _completions(sync)
    assert stats["num_async_sync_steps"] == 0


def test_steady_state_compiles_nothing(model_dir, prompts):
    llm = LLM(model_dir, num_kv_blocks=512, max_num_seqs=8, max_num_batched_tokens=64, async_scheduling=True)
    buckets = llm.engine.resolved.token_buckets
    from jaxllm.runner.step_io import STEP_VARIANTS

    assert llm.engine.warmup() <= llm.engine.runner.step_executables_per_bucket(STEP_VARIANTS) * len(buckets)
    warm = llm.get_stats()["num_compilations"]
    mixes = [
        SamplingParams(temperature=0.0, max_tokens=9, ignore_eos=True),
        SamplingParams(temperature=0.8, seed=2, max_tokens=5),
        SamplingParams(temperature=0.0, logprobs=2, max_tokens=3),
        SamplingParams(temperature=0.0, prompt_logprobs=1, max_tokens=2),
    ]
    for shift in range(2):
        params = [mixes[(i + shift) % len(mixes)] for i in range(len(prompts))]
        llm.generate(prompts, params, use_tqdm=False)
    stats = llm.get_stats()
    assert stats["num_compilations"] == warm
    assert stats["num_async_overlapped_steps"] > 0


def test_abort_while_in_flight(model_dir, prompts):
    """Aborting a request whose step is on the device drops its token; the others are unchanged."""
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)

    def run(async_scheduling):
        config = EngineConfig(model=model_dir, async_scheduling=async_scheduling,
                              cache=CacheConfig(num_kv_blocks=512))
        engine = Engine(config)
        for i, p in enumerate(prompts[:6]):
            engine.add_request(str(i), p, params)
        final, steps = {}, 0
        while engine.has_unfinished_requests():
            for out in engine.step():
                final[out.request_id] = out
            steps += 1
            if steps == 5:
                engine.abort_request("2")
        engine.kv_cache_manager.check_invariants()
        assert engine.kv_cache_manager.num_used_blocks == 0
        return {k: v.outputs[0].token_ids for k, v in final.items() if k != "2"}, engine

    sync, _ = run(False)
    ours, engine = run(True)
    assert ours == sync and len(ours) == 5
    assert engine.num_async_overlapped_steps > 0


def test_config_refuses_parallel():
    with pytest.raises(ValueError, match="async_scheduling"):
        EngineConfig(model="x", async_scheduling=True, parallel=ParallelConfig(tensor_parallel_size=2))
    with pytest.raises(ValueError, match="async_scheduling must be a bool"):
        EngineConfig(model="x", async_scheduling=1)
    assert not EngineConfig(model="x", async_scheduling=True, batch_invariant=True).overlaps_steps


# ---------------------------------------------------------------- the scheduler alone (host only)

def _scheduler(block_size=4, max_model_len=64, num_blocks=64):
    from jaxllm.core.kv_cache import KVCacheManager, cdiv
    from jaxllm.core.scheduler import Scheduler

    kv = KVCacheManager(num_blocks, block_size, 4, cdiv(max_model_len, block_size), enable_caching=True)
    return Scheduler(kv, "fcfs", 4, 16, max_model_len), kv


def _request(rid, n_prompt, first=100, **sp):
    from jaxllm.request import Request

    return Request(rid, list(range(first, first + n_prompt)), SamplingParams(**sp), eos_token_ids=(2,))


def test_scheduler_placeholder_row_and_stop_drop():
    """A request whose token is in flight gets a one-token row; when that token is EOS, the row
    of the next step is dropped: blocks freed, num_computed_tokens as a synchronous engine's."""
    s, kv = _scheduler()
    a, b = _request("a", 7, max_tokens=10), _request("b", 3, max_tokens=10)
    s.add_request(a)
    s.add_request(b)
    n1 = s.schedule()
    assert [(x.request_id, x.num_new_tokens, x.samples) for x in n1.scheduled] == [("a", 7, True), ("b", 3, True)]
    s.mark_in_flight(n1)
    assert (a.num_computed_tokens, a.num_output_placeholders) == (7, 1)
    n2 = s.schedule()  # before n1's tokens: each feeds its placeholder
    assert [(x.request_id, x.num_new_tokens, x.samples, x.num_computed_tokens) for x in n2.scheduled] == [
        ("a", 1, True, 7), ("b", 1, True, 3)]
    s.mark_in_flight(n2)
    assert a.num_output_placeholders == 2
    finished = s.update(n1, {"a": 2, "b": 9}, in_flight=True)  # a stops at EOS
    assert finished == [a] and a.output_token_ids == [2] and a.finish_reason == "stop"
    assert a.num_computed_tokens == 7 and a.num_output_placeholders == 0 and not kv.has_blocks("a")
    assert (b.output_token_ids, b.num_output_placeholders, b.num_computed_tokens) == ([9], 1, 4)
    assert s.update(n2, {"a": 5, "b": 8}, in_flight=True) == []  # a's extra token is dropped
    assert a.output_token_ids == [2] and b.output_token_ids == [9, 8]
    kv.check_invariants()


def test_scheduler_skips_row_past_max_tokens():
    """An in-flight token that reaches max_tokens (or max_model_len) gets no further row."""
    s, kv = _scheduler(max_model_len=12)
    a, b = _request("a", 4, max_tokens=1), _request("b", 10, max_tokens=20, ignore_eos=True)
    s.add_request(a)
    s.add_request(b)
    n1 = s.schedule()
    s.mark_in_flight(n1)
    n2 = s.schedule()
    assert [(x.request_id, x.num_new_tokens) for x in n2.scheduled] == [("b", 1)]  # b: 11 of 12 tokens
    s.mark_in_flight(n2)
    assert s.schedule().scheduled == []  # b's in-flight token is its 12th: max_model_len
    finished = s.update(n1, {"a": 7, "b": 7}, in_flight=True)
    assert [r.request_id for r in finished] == ["a"] and a.finish_reason == "length"
    assert [r.request_id for r in s.update(n2, {"b": 8}, in_flight=True)] == ["b"]
    assert b.finish_reason == "length" and kv.num_used_blocks == 0


def test_could_preempt_is_conservative():
    """could_preempt counts every running request's remaining tokens, placeholders included."""
    s, kv = _scheduler(num_blocks=6)  # 5 usable blocks of 4 tokens
    a = _request("a", 8, max_tokens=20, ignore_eos=True)
    s.add_request(a)
    s.mark_in_flight(s.schedule())  # a: 2 blocks, 8 computed + a placeholder -> needs 1 more
    assert kv.num_free_blocks == 3 and not s.could_preempt()
    s.add_request(_request("b", 8, first=200, max_tokens=20, ignore_eos=True))
    s.mark_in_flight(s.schedule())  # a takes its 3rd block, b its 2: none free
    assert kv.num_free_blocks == 0
    assert s.could_preempt()  # b's placeholder needs a 3rd block
