"""Prefix caching end to end against transformers: greedy tokens equal with the cache off, cold
and warm; shared prefixes admitted in one step and across steps; chunked; preempted; logprobs on
the cached path equal the uncached ones; prompt_logprobs bypass the cache; cache_salt; reset.

Tie rule (tests/helpers/tiny_models.py): a divergence is forgiven only at a step where HF's top-2
logits differ by less than TIE_TOL = 1e-4; comparison of that request stops there.
"""

import numpy as np
import pytest

from jaxllm import LLM, SamplingParams
from tests.helpers.tiny_models import assert_greedy_match, hf_greedy_with_margins, hf_logits, make_tiny_model, random_prompt

VOCAB = 512
BS = 16
# One cache shape for most engines here, so they share compiled steps.
COMMON = dict(num_kv_blocks=128, max_num_seqs=8, max_num_batched_tokens=256)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("prefix"), arch="llama", num_key_value_heads=2, seed=5)


@pytest.fixture(scope="module")
def workload(model_dir):
    """8 prompts: six share a 150-token prefix (one is exactly the prefix), one shares its first
    100 tokens, one shares nothing; with HF's greedy answers."""
    prefix = random_prompt(150, VOCAB, seed=100)
    prompts = [prefix + random_prompt(k, VOCAB, seed=200 + i) for i, k in enumerate([1, 10, 16, 33, 50])]
    prompts += [prefix, prefix[:100] + random_prompt(20, VOCAB, seed=300), random_prompt(120, VOCAB, seed=400)]
    max_tokens = [int(m) for m in np.random.default_rng(1).integers(4, 12, size=len(prompts))]
    expected = [hf_greedy_with_margins(model_dir, p, m) for p, m in zip(prompts, max_tokens)]
    return prompts, max_tokens, expected


def greedy(max_tokens, **kw):
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kw)


def run(llm, workload, **kw):
    """Generate the workload, check every answer against transformers, return the outputs."""
    prompts, max_tokens, expected = workload
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], [greedy(m, **kw) for m in max_tokens],
                        use_tqdm=False)
    for out, (tokens, margins), m in zip(outs, expected, max_tokens):
        assert len(out.outputs[0].token_ids) == m and out.outputs[0].finish_reason == "length"
        assert_greedy_match(out.outputs[0].token_ids, tokens, margins)
    assert llm.get_stats()["kv_blocks_used"] == 0
    llm.engine.kv_cache_manager.check_invariants()
    return outs


def same_tokens(outs, reference, workload):
    """Equal to another run's tokens (divergence forgiven only at an HF near-tie, as above)."""
    for a, b, (_, margins) in zip(outs, reference, workload[2]):
        assert_greedy_match(a.outputs[0].token_ids, b.outputs[0].token_ids, margins)


@pytest.fixture(scope="module")
def cache_off(model_dir, workload):
    llm = LLM(model_dir, enable_prefix_caching=False, **COMMON)
    outs = run(llm, workload)
    stats = llm.get_stats()
    assert stats["prefix_cache_hits"] == stats["prefix_cache_queries"] == 0
    assert [o.num_cached_tokens for o in outs] == [0] * len(outs)
    return outs


def test_cold_and_warm_match_transformers_and_cache_off(model_dir, workload, cache_off):
    prompts = workload[0]
    llm = LLM(model_dir, **COMMON)
    cold = run(llm, workload)
    # The 150-token prefix is 9 full blocks (144 tokens): every prompt that shares it hits them,
    # including those admitted in the first step right after prompt 0, whose blocks that same step
    # computes; prompt 5 *is* the prefix (its last token must be computed, so still 144);
    # prompt 6 shares 6 full blocks.
    assert [o.num_cached_tokens for o in cold] == [0, 144, 144, 144, 144, 144, 96, 0]
    stats = llm.get_stats()
    assert stats["prefix_cache_queries"] == sum(map(len, prompts))
    assert stats["prefix_cache_hits"] == 144 * 5 + 96
    assert stats["prefix_cache_hit_rate"] == pytest.approx(stats["prefix_cache_hits"] / stats["prefix_cache_queries"])
    same_tokens(cold, cache_off, workload)

    warm = run(llm, workload)  # everything is cached now: all but each prompt's last token hits
    assert [o.num_cached_tokens for o in warm] == [(len(p) - 1) // BS * BS for p in prompts]
    same_tokens(warm, cache_off, workload)


def test_same_long_prompt_admitted_in_one_step_shares_blocks(model_dir, cache_off):
    prompt = random_prompt(200, VOCAB, seed=7)
    tokens, margins = hf_greedy_with_margins(model_dir, prompt, 6)
    results = {}
    for caching in (True, False):
        llm = LLM(model_dir, enable_prefix_caching=caching, **COMMON)
        engine = llm.engine
        engine.add_request("a", {"prompt_token_ids": prompt}, greedy(6))
        engine.add_request("b", {"prompt_token_ids": prompt}, greedy(6))
        outs = {o.request_id: o for o in engine.step()}
        kv = engine.kv_cache_manager
        if caching:
            # Both prompts ran in the first step: b's first 12 blocks are a's, written in that
            # same step (before attention reads them), so b computed only its last 8 tokens.
            assert set(outs) == {"a", "b"}
            assert kv.blocks_of("a")[:12] == kv.blocks_of("b")[:12]
            assert (outs["a"].num_cached_tokens, outs["b"].num_cached_tokens) == (0, 192)
            assert engine.get_stats()["prefix_cache_hits"] == 192
        else:  # b got only the 56 tokens left of the 256-token budget
            assert set(outs) == {"a"} and engine.scheduler.get_request("b").num_computed_tokens == 56
            assert set(kv.blocks_of("a")).isdisjoint(kv.blocks_of("b"))
        while engine.has_unfinished_requests():
            for o in engine.step():
                outs[o.request_id] = o
        for rid in "ab":
            assert_greedy_match(outs[rid].outputs[0].token_ids, tokens, margins)
        results[caching] = [outs[r].outputs[0].token_ids for r in "ab"]
        kv.check_invariants()
    assert results[True] == results[False]


def test_chunked_prefill_with_prefix_caching(model_dir, workload, cache_off):
    llm = LLM(model_dir, num_kv_blocks=128, max_num_seqs=8, max_num_batched_tokens=64)
    outs = run(llm, workload)
    assert sum(o.num_cached_tokens for o in outs) > 0
    assert llm.get_stats()["num_steps"] > sum(map(len, workload[0])) // 64 // 2
    same_tokens(outs, cache_off, workload)


def test_preemption_with_prefix_caching(model_dir, workload, cache_off):
    # 19 usable blocks: enough for the largest request (14 blocks), far too few for the batch.
    llm = LLM(model_dir, num_kv_blocks=20, max_num_seqs=8, max_num_batched_tokens=256)
    outs = run(llm, workload)
    stats = llm.get_stats()
    assert stats["num_preemptions"] > 0 and stats["prefix_cache_hits"] > 0
    assert sum(o.num_cached_tokens > 0 for o in outs) >= 2
    same_tokens(outs, cache_off, workload)


def test_sampled_logprobs_on_the_cached_path_equal_the_uncached(model_dir, workload):
    prompts, max_tokens, _ = workload
    batch = [{"prompt_token_ids": p} for p in prompts[:6]]
    params = [greedy(m, logprobs=2) for m in max_tokens[:6]]
    off = LLM(model_dir, enable_prefix_caching=False, **COMMON).generate(batch, params, use_tqdm=False)
    on = LLM(model_dir, **COMMON)
    on.generate(batch, params, use_tqdm=False)  # fill the cache
    warm = on.generate(batch, params, use_tqdm=False)
    assert all(o.num_cached_tokens >= 144 for o in warm)
    for a, b in zip(warm, off):
        ca, cb = a.outputs[0], b.outputs[0]
        assert ca.token_ids == cb.token_ids
        for ea, eb in zip(ca.logprobs, cb.logprobs):
            assert ea.keys() == eb.keys()
            for t in ea:
                assert abs(ea[t].logprob - eb[t].logprob) < 1e-5, (t, ea[t], eb[t])
        assert abs(ca.cumulative_logprob - cb.cumulative_logprob) < 1e-4


def test_prompt_logprobs_bypass_the_cache(model_dir):
    prompt = random_prompt(70, VOCAB, seed=9)
    llm = LLM(model_dir, **COMMON)
    llm.generate({"prompt_token_ids": prompt}, greedy(2), use_tqdm=False)  # cache the prompt
    out = llm.generate({"prompt_token_ids": prompt}, greedy(2, prompt_logprobs=0), use_tqdm=False)[0]
    assert out.num_cached_tokens == 0
    ref = hf_logits(model_dir, prompt).astype(np.float64)
    ref = ref - ref.max(-1, keepdims=True)
    ref = ref - np.log(np.exp(ref).sum(-1, keepdims=True))
    got = [out.prompt_logprobs[p][t].logprob for p, t in enumerate(prompt) if p > 0]
    np.testing.assert_allclose(got, [ref[p - 1, t] for p, t in enumerate(prompt) if p > 0], atol=1e-4)
    # It still fills the cache for others.
    again = llm.generate({"prompt_token_ids": prompt}, greedy(2), use_tqdm=False)[0]
    assert again.num_cached_tokens == 64


def test_cache_salt_isolates_and_bad_salt_is_refused(model_dir):
    prompt = random_prompt(40, VOCAB, seed=11)
    llm = LLM(model_dir, **COMMON)
    engine = llm.engine
    for bad in (3, b"x", ["a"]):
        with pytest.raises(ValueError, match=f"cache_salt must be a str, got {bad!r}".replace("[", r"\[")):
            engine.add_request("bad", {"prompt_token_ids": prompt, "cache_salt": bad}, greedy(2))
        with pytest.raises(ValueError, match="cache_salt must be a str"):
            engine.add_request("bad", prompt, greedy(2), cache_salt=bad)
    assert not engine.has_unfinished_requests() and engine.get_stats()["prefix_cache_queries"] == 0
    got = []
    for s in ("t1", "t2", None, "t1"):
        p = {"prompt_token_ids": prompt} if s is None else {"prompt_token_ids": prompt, "cache_salt": s}
        got.append(llm.generate(p, greedy(3), use_tqdm=False)[0])
    assert [o.num_cached_tokens for o in got] == [0, 0, 0, 32]
    engine.add_request("kw", prompt, greedy(3), cache_salt="t2")  # the keyword is the same salt
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                assert o.num_cached_tokens == 32
    assert len({tuple(o.outputs[0].token_ids) for o in got}) == 1


def test_reset_prefix_cache(model_dir):
    prompt = random_prompt(40, VOCAB, seed=13)
    llm = LLM(model_dir, **COMMON)
    engine = llm.engine
    engine.add_request("a", prompt, greedy(3))
    engine.step()
    assert engine.reset_prefix_cache() is False  # a holds blocks
    while engine.has_unfinished_requests():
        engine.step()
    assert llm.generate({"prompt_token_ids": prompt}, greedy(1), use_tqdm=False)[0].num_cached_tokens == 32
    assert llm.reset_prefix_cache() is True
    assert llm.generate({"prompt_token_ids": prompt}, greedy(1), use_tqdm=False)[0].num_cached_tokens == 0
