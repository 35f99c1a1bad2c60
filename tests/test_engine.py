"""Engine end to end: greedy tokens equal transformers' whether requests run with ample cache,
under preemption, chunked, or under each scheduling policy; no compilation in steady state.

Tie rule (tests/helpers/tiny_models.py): a divergence is forgiven only at a step where HF's top-2
logits differ by less than TIE_TOL = 1e-4; comparison of that request stops there.
"""

import numpy as np
import pytest

from jaxllm import LLM, SamplingParams
from jaxllm.runner.step_io import STEP_VARIANTS
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


MIXED_PARAMS = [
    SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True),
    SamplingParams(temperature=0.8, top_p=0.9, seed=1, max_tokens=5),
    SamplingParams(temperature=1.1, top_k=5, min_p=0.05, max_tokens=3, logprobs=3),
    SamplingParams(temperature=0.0, repetition_penalty=1.3, presence_penalty=0.5, max_tokens=4),
    SamplingParams(temperature=0.7, frequency_penalty=1.0, min_tokens=2, stop_token_ids=[5], max_tokens=4),
    SamplingParams(temperature=0.0, prompt_logprobs=2, logprobs=0, max_tokens=2),
    SamplingParams(temperature=0.0, logprobs=20, max_tokens=3),
]


def test_no_compilation_in_steady_state(model_dir, workload):
    """After warmup(), no mix of sampling parameters compiles anything, and each token bucket
    has at most len(STEP_VARIANTS) executables."""
    llm = LLM(model_dir, num_kv_blocks=512, max_num_seqs=16, max_num_batched_tokens=512)
    buckets = llm.engine.resolved.token_buckets
    # Compiled steps are shared across engines in a process, so earlier tests may have compiled
    # some variants already; warm-up compiles at most every variant of every bucket.
    assert llm.engine.warmup() <= llm.engine.runner.step_executables_per_bucket(STEP_VARIANTS) * len(buckets)
    warm = llm.get_stats()["num_compilations"]
    prompts = workload[0]
    for shift in range(3):  # each prompt under several parameter sets, in changing company
        params = [MIXED_PARAMS[(i + shift) % len(MIXED_PARAMS)] for i in range(len(prompts))]
        llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    stats = llm.get_stats()
    assert stats["num_compilations"] == warm
    assert stats["num_step_variants"] == len(STEP_VARIANTS) * len(buckets)  # warm-up ran them all


def test_engines_share_compiled_steps(model_dir, workload):
    greedy = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    first = LLM(model_dir, num_kv_blocks=300, max_num_seqs=8, max_num_batched_tokens=64)
    # A cache shape no other test uses: fused, every bucket and variant compiles exactly once
    # here; layered (the embedding, the layer and one head per variant), the embedding and heads
    # do not depend on the cache shape, so earlier tests may have compiled some of them.
    expected = first.engine.runner.step_executables_per_bucket(STEP_VARIANTS) * len(first.engine.resolved.token_buckets)
    executables = first.get_stats()["num_executables"]
    compiled = first.engine.warmup()
    assert (compiled == expected) if first.engine.runner.compilation == "fused" else (0 < compiled <= expected)
    expected = compiled
    assert first.get_stats()["num_executables"] == executables + expected
    # Same model and shapes, another policy: nothing to compile.
    second = LLM(model_dir, num_kv_blocks=300, max_num_seqs=8, max_num_batched_tokens=64,
                 scheduling_policy="sjf")
    assert second.engine.warmup() == 0
    second.generate([{"prompt_token_ids": p} for p in workload[0][:4]], MIXED_PARAMS[:4], use_tqdm=False)
    assert second.get_stats()["num_compilations"] == 0
    assert second.get_stats()["num_executables"] == executables + expected


def test_request_alone_equals_batched(model_dir, workload):
    prompts = workload[0]
    llm = LLM(model_dir, num_kv_blocks=512, max_num_seqs=16, max_num_batched_tokens=128)
    params = SamplingParams(temperature=0.8, top_p=0.9, seed=7, max_tokens=12, ignore_eos=True)
    alone = llm.generate({"prompt_token_ids": prompts[9]}, params, use_tqdm=False)[0]
    batch = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert batch[9].outputs[0].token_ids == alone.outputs[0].token_ids
