"""The public API around the engine: bad input, abort, stops, logprobs, chat, metrics.

The tiny model gets a word-level tokenizer (token i <-> word "<wi>"), so decoded text and stop
strings are predictable.
"""

import numpy as np
import pytest

from jaxllm import LLM, SamplingParams
from jaxllm.engine import Engine
from tests.helpers.tiny_models import hf_logits, make_tiny_model, random_prompt
from tests.helpers.tiny_tokenizer import add_word_tokenizer, text_of, word

VOCAB = 512


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = make_tiny_model(tmp_path_factory.mktemp("api"), arch="llama", seed=3)
    add_word_tokenizer(path, VOCAB)
    return path


@pytest.fixture(scope="module")
def llm(model_dir):
    # 19 usable blocks of 16 tokens: a request needing more than 304 slots can never run.
    return LLM(model_dir, num_kv_blocks=20, max_num_seqs=8, max_num_batched_tokens=128, max_model_len=256)


def greedy(max_tokens, **kw):
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kw)


def ids(n, seed):
    return {"prompt_token_ids": random_prompt(n, VOCAB, seed=seed)}


def test_bad_prompts_are_refused_and_others_unaffected(llm):
    good = [ids(20, 1), ids(40, 2)]
    reference = llm.generate(good, greedy(6), use_tqdm=False)
    prompts = [
        good[0],
        ids(300, 3),  # longer than max_model_len=256
        {"prompt_token_ids": []},  # empty
        {"prompt_token_ids": [5, 9999]},  # outside the vocabulary
        good[1],
    ]
    params = [greedy(6)] * 4 + [greedy(6)]
    with pytest.warns(UserWarning, match="3 of 5 prompts were refused"):
        outs = llm.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in (outs[0], outs[4])] == [
        r.outputs[0].token_ids for r in reference
    ]
    assert "300 tokens" in outs[1].error and "max_model_len=256" in outs[1].error
    assert "empty" in outs[2].error
    assert "9999" in outs[3].error and "[0, 512)" in outs[3].error
    for o in outs[1:4]:
        assert o.finished and o.outputs[0].finish_reason == "error"
    assert llm.get_stats()["kv_blocks_used"] == 0


def test_request_that_never_fits_the_cache(llm):
    # 250 prompt + 100 outputs needs 22 blocks; the cache has 19 (max_model_len caps at 256 -> 16).
    big = LLM(llm.engine.config.model, num_kv_blocks=10, max_num_seqs=4, max_num_batched_tokens=128)
    with pytest.raises(ValueError, match="needs 22 KV blocks .* the whole cache has 9"):
        big.engine.add_request("r", ids(250, 4)["prompt_token_ids"], greedy(100))
    assert not big.engine.has_unfinished_requests()


def test_add_request_errors_name_the_value(llm):
    engine: Engine = llm.engine
    engine.add_request("dup", ids(5, 5), greedy(2))
    with pytest.raises(ValueError, match="'dup' is already in use"):
        engine.add_request("dup", ids(5, 6), greedy(2))
    with pytest.raises(ValueError, match="token ids must be ints, got 'x'"):
        engine.add_request("bad", {"prompt_token_ids": [1, "x"]}, greedy(2))
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-0.5)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=1.5)
    while engine.has_unfinished_requests():
        engine.step()
    with pytest.raises(ValueError, match="scheduling_policy|policy"):
        LLM(llm.engine.config.model, scheduling_policy="nope")


def test_abort_frees_blocks_and_others_continue(llm):
    engine: Engine = llm.engine
    alone = llm.generate([ids(30, 7), ids(50, 8)], greedy(10), use_tqdm=False)
    for rid, p in zip("abc", [ids(30, 7), ids(100, 9), ids(50, 8)]):
        engine.add_request(rid, p, greedy(10))
    engine.step()
    engine.step()
    assert engine.block_manager.blocks_of("b")
    engine.abort_request("b")
    assert not engine.block_manager.has_blocks("b")
    engine.block_manager.check_invariants()
    final = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            final[out.request_id] = out
    assert set(final) == {"a", "c"}
    assert final["a"].outputs[0].token_ids == alone[0].outputs[0].token_ids
    assert final["c"].outputs[0].token_ids == alone[1].outputs[0].token_ids
    assert engine.block_manager.num_used_blocks == 0


def test_text_stop_strings_and_stop_token_ids(llm):
    prompt = ids(25, 10)
    base = llm.generate(prompt, greedy(12), use_tqdm=False)[0].outputs[0]
    assert base.text == text_of(base.token_ids)
    k = 4
    while base.token_ids[k] in base.token_ids[:k]:  # first occurrence, so the cut is predictable
        k += 1
    stop_word = word(base.token_ids[k])

    out = llm.generate(prompt, greedy(12, stop=[stop_word]), use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop_word
    assert out.token_ids == base.token_ids[: k + 1]
    assert out.text == text_of(base.token_ids[:k]) + " "
    out = llm.generate(prompt, greedy(12, stop=stop_word, include_stop_str_in_output=True), use_tqdm=False)[0].outputs[0]
    assert out.text == text_of(base.token_ids[: k + 1])

    out = llm.generate(prompt, greedy(12, stop_token_ids=[base.token_ids[k]]), use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == base.token_ids[k]
    assert out.token_ids == base.token_ids[: k + 1]

    # min_tokens masks the stop token until k + 2 outputs exist, so generation must go past k.
    out = llm.generate(prompt, greedy(12, stop_token_ids=[base.token_ids[k]], min_tokens=k + 2), use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) >= k + 2
    assert base.token_ids[k] not in out.token_ids[: k + 1]


def test_logprobs_match_transformers(llm, model_dir):
    prompt = ids(40, 11)
    out = llm.generate(prompt, greedy(5, logprobs=3, prompt_logprobs=2), use_tqdm=False)[0]
    toks = out.outputs[0].token_ids
    full = prompt["prompt_token_ids"] + toks
    ref = hf_logits(model_dir, full).astype(np.float64)
    ref = ref - np.log(np.exp(ref - ref.max(-1, keepdims=True)).sum(-1, keepdims=True)) - ref.max(-1, keepdims=True)
    n_prompt = len(prompt["prompt_token_ids"])
    for step, entry in enumerate(out.outputs[0].logprobs):
        row = ref[n_prompt - 1 + step]
        top = np.argsort(-row)[:3]
        assert [t for t, lp in entry.items() if lp.rank is not None] == top.tolist()
        for t, lp in entry.items():
            assert abs(lp.logprob - row[t]) < 1e-4
            assert lp.decoded_token == word(t)
        assert toks[step] in entry
    assert out.outputs[0].cumulative_logprob == pytest.approx(
        sum(ref[n_prompt - 1 + i, t] for i, t in enumerate(toks)), abs=1e-3
    )
    plp = out.prompt_logprobs
    assert plp[0] is None and len(plp) == n_prompt
    for pos in range(1, n_prompt):
        target = prompt["prompt_token_ids"][pos]
        assert abs(plp[pos][target].logprob - ref[pos - 1, target]) < 1e-4
        ranked = [t for t, lp in plp[pos].items() if lp.rank is not None]
        assert ranked == np.argsort(-ref[pos - 1])[:2].tolist()


def test_prompt_logprobs_survive_chunking(model_dir):
    chunky = LLM(model_dir, num_kv_blocks=64, max_num_seqs=4, max_num_batched_tokens=16)
    prompt = ids(50, 12)
    out = chunky.generate(prompt, greedy(2, prompt_logprobs=0), use_tqdm=False)[0]
    ref = hf_logits(model_dir, prompt["prompt_token_ids"]).astype(np.float64)
    ref = ref - np.log(np.exp(ref).sum(-1, keepdims=True))
    got = [out.prompt_logprobs[p][t].logprob for p, t in enumerate(prompt["prompt_token_ids"]) if p > 0]
    want = [ref[p - 1, t] for p, t in enumerate(prompt["prompt_token_ids"]) if p > 0]
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_chat_uses_the_template(llm):
    conv = [{"role": "user", "content": "<w5> <w6>"}]
    out = llm.chat(conv, greedy(3), use_tqdm=False)[0]
    assert out.prompt == "<w10> <w5> <w6> <w11> <w12>"
    assert out.prompt_token_ids == [10, 5, 6, 11, 12]
    assert len(out.outputs[0].token_ids) == 3


def test_metrics_and_text_prompts(llm):
    out = llm.generate(text_of([7, 8, 9]), greedy(4), use_tqdm=False)[0]
    assert out.prompt_token_ids == [7, 8, 9]
    m = out.metrics
    assert m.first_scheduled_time >= m.arrival_time
    assert m.ttft is not None and m.ttft > 0
    assert m.mean_tpot is not None and m.mean_tpot > 0
    assert m.num_preemptions == 0


def test_model_without_tokenizer_takes_token_ids(tmp_path):
    path = make_tiny_model(tmp_path, arch="llama", seed=5)
    bare = LLM(path, num_kv_blocks=32, max_num_seqs=2, max_num_batched_tokens=32)
    assert bare.get_tokenizer() is None
    out = bare.generate(ids(10, 13), greedy(3), use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 3 and out.outputs[0].text == ""
    with pytest.warns(UserWarning, match="needs a tokenizer"):
        res = bare.generate("hello", greedy(3), use_tqdm=False)
    assert "needs a tokenizer" in res[0].error


def test_a_failing_request_does_not_stop_the_others(model_dir):
    # A tokenizer that cannot decode one request's output (e.g. a model vocabulary larger than
    # the tokenizer's) errors that request alone; the others finish normally.
    llm = LLM(model_dir, num_kv_blocks=64, max_num_seqs=4, max_num_batched_tokens=64)
    good, bad = ids(12, 20), ids(30, 21)
    expected = llm.generate(good, greedy(5), use_tqdm=False)[0].outputs[0].token_ids
    poison = llm.generate(bad, greedy(1), use_tqdm=False)[0].outputs[0].token_ids[0]
    tok = llm.get_tokenizer()
    real_decode = tok.decode

    def decode(token_ids, *args, **kwargs):
        if list(token_ids)[:1] == [poison]:
            raise IndexError(f"token {poison} is not in the tokenizer")
        return real_decode(token_ids, *args, **kwargs)

    tok.decode = decode
    try:
        outs = llm.generate([bad, good], greedy(5), use_tqdm=False)
    finally:
        tok.decode = real_decode
    assert outs[0].outputs[0].finish_reason == "error" and f"token {poison}" in outs[0].error
    assert outs[1].outputs[0].token_ids == expected and outs[1].error is None
    assert llm.get_stats()["kv_blocks_used"] == 0


def test_max_tokens_none_runs_to_max_model_len(llm):
    # vLLM's meaning of max_tokens=None: generate until the request reaches max_model_len (256).
    out = llm.generate(ids(240, 22), greedy(None), use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 16 and out.finish_reason == "length"


def _failing_step(runner, should_fail, consume_kv_cache: bool):
    """Make the runner's steps whose statics (sampler, prompt_logprobs, ...) match `should_fail`
    raise, as a failed compilation (nothing consumed) or a failed execution (the donated KV cache
    consumed) would: the fused step's jitted function, or the whole layered chain (a failure
    there may come after some layers' donated caches were consumed: all of them are, here).
    Returns a function that undoes it."""
    name = "_jitted" if runner.compilation == "fused" else "_run_layered"
    real = getattr(runner, name)

    def fail(kv_caches):
        if consume_kv_cache:
            for k, v in kv_caches:
                k.delete()
                v.delete()
        raise RuntimeError("LLVM compilation error: Cannot allocate memory")

    def fused(params, kv_caches, *args, **statics):
        if should_fail(statics):
            fail(kv_caches)
        return real(params, kv_caches, *args, **statics)

    def layered(step, *layers):
        if should_fail({"sampler": step.sampler, "prompt_logprobs": step.prompt_logprobs,
                        "instrumented": step.instrumented}):
            fail(runner.kv_caches)
        return real(step, *layers)

    setattr(runner, name, fused if name == "_jitted" else layered)
    return lambda: setattr(runner, name, real)


@pytest.mark.parametrize("compilation", ["fused", "layered"])
def test_failed_compilation_ends_its_requests_and_the_engine_keeps_serving(model_dir, compilation):
    llm = LLM(model_dir, num_kv_blocks=64, max_num_seqs=4, max_num_batched_tokens=64, compilation=compilation)
    expected = llm.generate(ids(12, 30), greedy(5), use_tqdm=False)[0].outputs[0].token_ids
    restore = _failing_step(llm.engine.runner, lambda s: s["sampler"] == "general", consume_kv_cache=False)
    random_params = SamplingParams(temperature=0.8, max_tokens=5)
    outs = llm.generate([ids(12, 30), ids(20, 31)], [greedy(5), random_params], use_tqdm=False)
    for out in outs:  # the failed step held both: both end with the cause named
        assert out.finished and out.outputs[0].finish_reason == "error"
        assert "Cannot allocate memory" in out.error
    # The engine still serves requests that do not need the failing variant, and lost nothing.
    assert llm.generate(ids(12, 30), greedy(5), use_tqdm=False)[0].outputs[0].token_ids == expected
    stats = llm.get_stats()
    assert stats["num_failed_steps"] == 1 and stats["kv_blocks_used"] == 0
    restore()


@pytest.mark.parametrize("compilation", ["fused", "layered"])
def test_failed_step_that_consumed_the_kv_cache_recomputes_the_others(model_dir, compilation):
    # One seat: "b" waits while "a" runs; a failure that consumed the donated KV cache ends "a",
    # and "b" then runs on a fresh cache with the right tokens.
    llm = LLM(model_dir, num_kv_blocks=64, max_num_seqs=1, max_num_batched_tokens=64, compilation=compilation)
    expected = llm.generate(ids(9, 33), greedy(4), use_tqdm=False)[0].outputs[0].token_ids
    engine = llm.engine
    calls = []

    def second_call(statics):  # "a"'s prefill succeeds, its first decode fails
        calls.append(statics)
        return len(calls) == 2

    restore = _failing_step(engine.runner, second_call, consume_kv_cache=True)
    engine.add_request("a", ids(9, 32), greedy(4))
    engine.add_request("b", ids(9, 33), greedy(4))
    finished = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
    assert finished["a"].outputs[0].finish_reason == "error" and "Cannot allocate" in finished["a"].error
    assert finished["b"].outputs[0].token_ids == expected and finished["b"].error is None
    assert not engine.runner.kv_cache_lost() and llm.get_stats()["kv_blocks_used"] == 0
    restore()


def test_step_observers_see_every_step(llm):
    seen = []
    llm.engine.add_step_observer(seen.append)
    before = llm.get_stats()["num_steps"]
    first = llm.engine.num_recorded_steps
    outs = llm.generate([ids(20, 40), ids(150, 41)], greedy(3), use_tqdm=False)
    llm.engine.remove_step_observer(seen.append)
    assert len(seen) == llm.get_stats()["num_steps"] - before > 0  # nothing preempted here
    assert [s.step for s in seen] == list(range(first, first + len(seen)))
    assert all(s.num_padded_tokens in llm.engine.resolved.token_buckets for s in seen)
    assert all(s.num_batched_tokens <= s.num_padded_tokens for s in seen)
    assert all(s.kv_blocks_referenced >= s.kv_blocks_used for s in seen)
    assert max(s.kv_blocks_used for s in seen) >= 11  # the 150-token prompt holds 10 blocks of 16
    assert sum(s.num_finished for s in seen) == 2 and seen[-1].kv_blocks_used > 0  # held while it ran
    assert llm.get_stats()["kv_blocks_used"] == 0
    # The batch: a 128-token budget chunks the 150-token prompt (20 + 108, then 42), then 2 decodes.
    assert [s.scheduled for s in seen[:3]] == [
        ((outs[0].request_id, 20), (outs[1].request_id, 108)),
        ((outs[0].request_id, 1), (outs[1].request_id, 42)),
        ((outs[0].request_id, 1), (outs[1].request_id, 1)),
    ]
    assert [(s.num_prefill_tokens, s.num_decode_tokens) for s in seen[:3]] == [(128, 0), (42, 1), (0, 2)]
    assert [(s.num_prefill_requests, s.num_decode_requests) for s in seen[:3]] == [(2, 0), (1, 1), (0, 2)]
    assert [s.num_context_tokens for s in seen[:3]] == [128, 21 + 150, 22 + 151]
    for s in seen:
        assert s.num_prefill_tokens + s.num_decode_tokens == s.num_batched_tokens == sum(n for _, n in s.scheduled)
        assert s.kv_blocks_used + s.kv_blocks_free == s.num_kv_blocks == 19
        assert s.start_time <= s.time <= s.end_time
        assert s.host_time > 0 and s.device_time > 0 and 0 <= s.compile_time <= s.device_time
        assert s.host_time + s.device_time == pytest.approx(s.end_time - s.start_time)
    # Requests: every output token's time; TTFT, ITL and the step records share one clock.
    for out in outs:
        m = out.metrics
        assert len(m.token_times) == m.num_output_tokens == 3
        assert m.token_times[0] == m.first_token_time and m.token_times[-1] == m.last_token_time
        assert m.inter_token_latencies == pytest.approx(np.diff(m.token_times).tolist())
        assert set(m.token_times) <= {s.time for s in seen}
    llm.generate(ids(5, 42), greedy(1), use_tqdm=False)
    assert len(seen) == llm.get_stats()["num_steps"] - before - 1  # removed: no more records


def test_prefix_cache_hits_in_step_records(llm):
    seen = []
    llm.engine.add_step_observer(seen.append)
    prompt = ids(64, 43)
    llm.generate(prompt, greedy(1), use_tqdm=False)
    seen.clear()
    out = llm.generate(prompt, greedy(1), use_tqdm=False)[0]
    llm.engine.remove_step_observer(seen.append)
    # 64 tokens = 4 full blocks; the last token is always computed, so 3 blocks are hits.
    assert out.num_cached_tokens == out.metrics.num_cached_tokens == 48
    assert (seen[0].prefix_cache_queries, seen[0].prefix_cache_hits) == (64, 48)
    assert seen[0].kv_blocks_cached >= 4 and seen[0].scheduled == ((out.request_id, 16),)
