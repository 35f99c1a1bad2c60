"""LLM(batch_invariant=True): a request's logprobs are bitwise identical alone, in any company, in
one chunk or several, after a preemption (recompute and swap) and from the prefix cache.

Every engine here has the same KV cache and token buckets, so they share compiled steps.
"""

import jax.numpy as jnp
import numpy as np
import pytest

from attention_cases import make_case, outputs_across_company_and_chunking
from jaxllm import LLM, SamplingParams
from jaxllm.config import EngineConfig, ParallelConfig
from jaxllm.attention import invariant
from jaxllm.attention.reference import dense_reference
from jaxllm.core.policies import POLICIES
from tests.helpers.tiny_models import assert_greedy_match, hf_greedy_with_margins, make_tiny_model, random_prompt

VOCAB = 512
# max_num_seqs 32: the sampler's rows follow the bucket (16 or 32), so they change too.
ENGINE = dict(num_kv_blocks=20, max_num_seqs=32, token_buckets=(16, 64), skip_tokenizer_init=True,
              batch_invariant=True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("invariance"), arch="llama")


def ids(n, seed):
    return {"prompt_token_ids": random_prompt(n, VOCAB, seed=seed)}


TARGET = ids(70, seed=100)
TARGET_PARAMS = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=20)


def run_target(llm, before=(), company=()):
    """Run `before` to completion, then TARGET with `company` (arriving first); return TARGET's
    output and its (tokens, [top-20 logprobs per step]) record."""
    if before:
        llm.generate(list(before), SamplingParams(temperature=0.0, max_tokens=2), use_tqdm=False)
    others = [p for p, _ in company]
    outs = llm.generate(others + [TARGET], [q for _, q in company] + [TARGET_PARAMS], use_tqdm=False)
    out = outs[-1]
    return out, record_of(out)


def record_of(out):
    """(tokens, [sorted (token, logprob) per step]) of a request's only completion."""
    comp = out.outputs[0]
    return comp.token_ids, [sorted((t, e.logprob) for t, e in entry.items()) for entry in comp.logprobs]


def company(n, seed, length=50, max_tokens=12, step=7):
    sampled = SamplingParams(temperature=0.9, seed=seed, max_tokens=max_tokens, ignore_eos=True)
    greedy = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    return [(ids(length + step * i, seed=seed + i), sampled if i % 2 else greedy) for i in range(n)]


def test_logprobs_bitwise_identical_across_scenarios(model_dir):
    wide = LLM(model_dir, max_num_batched_tokens=64, **ENGINE)
    out, alone = run_target(wide)
    tokens, margins = hf_greedy_with_margins(model_dir, TARGET["prompt_token_ids"], 8)
    assert_greedy_match(alone[0], tokens, margins)

    _, batched = run_target(wide, company=company(3, seed=1, length=10))
    assert batched == alone
    _, batched = run_target(wide, company=company(2, seed=5, length=33))
    assert batched == alone

    narrow = LLM(model_dir, max_num_batched_tokens=16, **ENGINE)  # 70 prompt tokens in 5 chunks
    _, chunked = run_target(narrow, company=company(1, seed=9, length=20))
    assert chunked == alone

    # The first two blocks cached by another request, computed in a 42-token step of its own.
    fresh = LLM(model_dir, max_num_batched_tokens=64, **ENGINE)
    cached, from_cache = run_target(fresh, before=[{"prompt_token_ids": TARGET["prompt_token_ids"][:40]}])
    assert cached.num_cached_tokens == 32 and from_cache == alone

    for mode in ("recompute", "swap"):
        # 19 usable blocks: three 62-token requests (4 blocks each) and TARGET (5) are admitted;
        # when the three need a fifth block, the newest (TARGET) is preempted.
        llm = LLM(model_dir, max_num_batched_tokens=64, preemption_mode=mode, enable_prefix_caching=False,
                  **ENGINE)
        preempted, record = run_target(llm, company=company(3, seed=20, length=62, max_tokens=40, step=0))
        assert preempted.metrics.num_preemptions > 0, mode
        if mode == "swap":
            assert llm.get_stats()["num_swap_outs"] > 0
        assert record == alone, mode


# Mixed prompt lengths; the 45-token prompt starts with TARGET's first 40 tokens, so with prefix
# caching on it reuses TARGET's blocks (or TARGET its) depending on who the policy runs first.
MIX_PROMPTS = [TARGET, ids(9, seed=200), {"prompt_token_ids": TARGET["prompt_token_ids"][:40] + [7, 8, 9, 10, 11]},
               ids(33, seed=201), ids(21, seed=202)]
MIX_PARAMS = [SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=5),
              SamplingParams(temperature=0.8, seed=1234, max_tokens=6, ignore_eos=True, logprobs=5)]
# Priorities against arrival order, so "priority" admits in yet another order.
MIX_PRIORITY = [3, 0, 1, 4, 2]
# Scheduler settings: wide batches; 2 seats (the rest wait and join later); 16-token steps (the 70-
# and 33-token prompts prefill in chunks next to decodes); prefix caching off.
MIX_SETTINGS = [dict(max_num_batched_tokens=64), dict(max_num_batched_tokens=64, max_num_seqs=2),
                dict(max_num_batched_tokens=16), dict(max_num_batched_tokens=64, enable_prefix_caching=False)]


def test_every_policy_and_scheduler_setting_gives_bitwise_identical_outputs(model_dir):
    """The same greedy and seeded-sampled requests under every registered policy and a few
    scheduler settings: each request's tokens and top-5 logprobs are bitwise the same everywhere."""
    params = [MIX_PARAMS[i % 2] for i in range(len(MIX_PROMPTS))]
    records = {}
    for policy in sorted(POLICIES):
        for setting in MIX_SETTINGS:
            llm = LLM(model_dir, **{**ENGINE, **setting, "scheduling_policy": policy})
            outs = llm.generate(MIX_PROMPTS, params, priority=MIX_PRIORITY, use_tqdm=False)
            records[policy, tuple(sorted(setting.items()))] = [record_of(o) for o in outs]
            # TARGET or the 45-token prompt (whichever runs second) reads two cached blocks.
            cached = sum(o.num_cached_tokens for o in outs)
            assert cached == (32 if setting.get("enable_prefix_caching", True) else 0), (policy, setting)
    (first_key, first), *rest = records.items()
    assert all(len(tokens) == 6 for tokens, _ in first)
    for key, record in rest:
        for i, (got, want) in enumerate(zip(record, first)):
            assert got == want, f"request {i}: {key} differs from {first_key}"


def test_invariant_attention_matches_dense_reference():
    for seqs, kw in [([(1, 1), (7, 7), (1, 40), (20, 300), (33, 33)], {}),
                     ([(5, 200), (1, 90), (17, 17)], dict(sliding_window=48)),
                     ([(0, 5), (1, 1), (3, 9)], dict(soft_cap=5.0))]:
        case = make_case(seqs, block_size=8)
        out = np.asarray(invariant.ragged_paged_attention(*map(jnp.asarray, case.args()), sm_scale=case.sm_scale, **kw))
        assert np.all(np.isfinite(out)), "NaN leaked from unused blocks"
        np.testing.assert_array_equal(out[int(case.cu_q_lens[-1]):], 0.0)
        np.testing.assert_allclose(out, dense_reference(*case.args(), sm_scale=case.sm_scale, **kw),
                                   atol=2e-5, rtol=2e-5)


def test_invariant_attention_row_independent_of_company_and_chunking():
    """The same sequence's last token, decoded alone, with company, or as the end of a prefill
    chunk of 1, 9 or 30 tokens: bitwise the same output."""
    outs = outputs_across_company_and_chunking(invariant.ragged_paged_attention)
    for o in outs[1:]:
        np.testing.assert_array_equal(o, outs[0])


def test_bad_batch_invariant_config(model_dir):
    with pytest.raises(ValueError, match="batch_invariant must be a bool"):
        LLM(model_dir, batch_invariant="yes")
