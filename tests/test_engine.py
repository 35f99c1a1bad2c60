"""Engine end to end: greedy tokens equal transformers' whether requests run with ample cache,
under preemption, chunked, or under each scheduling policy; no compilation in steady state.

Tie rule (tests/helpers/tiny_models.py): a divergence is forgiven only at a step where HF's top-2
logits differ by less than TIE_TOL = 1e-4; comparison of that request stops there.
"""

import numpy as np
import pytest

from jaxllm import LLM, SamplingParams
from tests.helpers.tiny_models import assert_greedy_match, hf_greedy_with_margins, make_tiny_model, random_prompt

NUM_PROMPTS = 16
VOCAB = 512


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("engine"), arch="llama", num_key_value_heads=2)


@pytest.fixture(scope="module")
def workload(model_dir):
    """16 prompts of lengths 1..300 with varied max_tokens, and HF's greedy answers."""
    rng = np.random.default_rng(0)
    lengths = [1, 2, 15, 16, 17, 33, 64, 100, 128, 150, 190, 220, 255, 270, 290, 300]
    assert len(lengths) == NUM_PROMPTS
    prompts = [random_prompt(n, VOCAB, seed=i) for i, n in enumerate(lengths)]
    max_tokens = [int(m) for m in rng.integers(1, 40, size=NUM_PROMPTS)]
    expected = [hf_greedy_with_margins(model_dir, p, m) for p, m in zip(prompts, max_tokens)]
    return prompts, max_tokens, expected


def _run(llm, workload, priorities=None):
    prompts, max_tokens, expected = workload
    params = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True) for m in max_tokens]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False, priority=priorities)
    for out, (tokens, margins), m in zip(outs, expected, max_tokens):
        ours = out.outputs[0].token_ids
        assert len(ours) == m and out.outputs[0].finish_reason == "length"
        assert_greedy_match(ours, tokens, margins)
    stats = llm.get_stats()
    assert stats["kv_blocks_used"] == 0, "finished requests must free their blocks"
    llm.engine.block_manager.check_invariants()
    return stats


def test_ample_cache_matches_transformers(model_dir, workload):
    llm = LLM(model_dir, num_kv_blocks=512, max_num_seqs=16, max_num_batched_tokens=512)
    stats = _run(llm, workload)
    assert stats["num_preemptions"] == 0


def test_preemption_matches_transformers(model_dir, workload):
    # 24 usable blocks of 16 tokens hold the longest request (<= 21 blocks) but not the batch.
    llm = LLM(model_dir, num_kv_blocks=25, max_num_seqs=16, max_num_batched_tokens=512)
    stats = _run(llm, workload)
    assert stats["num_preemptions"] > 0


def test_chunked_prefill_matches_transformers(model_dir, workload):
    # A 64-token budget splits every prompt longer than 64 over several steps.
    llm = LLM(model_dir, num_kv_blocks=512, max_num_seqs=16, max_num_batched_tokens=64)
    _run(llm, workload)
    assert llm.get_stats()["num_steps"] > max(len(p) for p in workload[0]) // 64


@pytest.mark.parametrize("policy", ["priority", "sjf", "static"])
def test_policies_match_transformers(model_dir, workload, policy):
    llm = LLM(model_dir, num_kv_blocks=81, max_num_seqs=8, max_num_batched_tokens=128,
              scheduling_policy=policy)
    priorities = [i % 3 for i in range(NUM_PROMPTS)] if policy == "priority" else None
    _run(llm, workload, priorities)


def test_no_compilation_in_steady_state(model_dir, workload):
    llm = LLM(model_dir, num_kv_blocks=512, max_num_seqs=16, max_num_batched_tokens=512)
    greedy = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    llm.engine.warmup(greedy)
    warm = llm.get_stats()["num_compilations"]
    # Compiled steps are shared across engines in a process, so earlier tests may have compiled
    # some buckets already; warm-up compiles at most one step per bucket.
    assert warm <= len(llm.engine.resolved.token_buckets)
    prompts = workload[0]
    llm.generate([{"prompt_token_ids": p} for p in prompts], greedy, use_tqdm=False)
    assert llm.get_stats()["num_compilations"] == warm


def test_engines_share_compiled_steps(model_dir, workload):
    greedy = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    first = LLM(model_dir, num_kv_blocks=300, max_num_seqs=8, max_num_batched_tokens=64)
    first.engine.warmup(greedy)
    # A cache shape no other test uses: every bucket compiles exactly once here.
    assert first.get_stats()["num_compilations"] == len(first.engine.resolved.token_buckets)
    # Same model and shapes, another policy: nothing to compile.
    second = LLM(model_dir, num_kv_blocks=300, max_num_seqs=8, max_num_batched_tokens=64,
                 scheduling_policy="sjf")
    second.engine.warmup(greedy)
    second.generate([{"prompt_token_ids": p} for p in workload[0][:4]], greedy, use_tqdm=False)
    assert second.get_stats()["num_compilations"] == 0


def test_request_alone_equals_batched(model_dir, workload):
    prompts = workload[0]
    llm = LLM(model_dir, num_kv_blocks=512, max_num_seqs=16, max_num_batched_tokens=128)
    params = SamplingParams(temperature=0.8, top_p=0.9, seed=7, max_tokens=12, ignore_eos=True)
    alone = llm.generate({"prompt_token_ids": prompts[9]}, params, use_tqdm=False)[0]
    batch = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert batch[9].outputs[0].token_ids == alone.outputs[0].token_ids
