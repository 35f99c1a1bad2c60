"""Swap preemption end to end: the runner's jitted copies round-trip K/V exactly (permuted block
ids, chunked, padded); greedy tokens equal transformers' and recompute mode's on a cache small
enough to preempt; a seeded random workload is identical in both modes; a host pool too small
falls back to recompute (counted); a policy may swap in a recompute engine; nothing compiles
after warm-up in swap mode.

Tie rule (tests/helpers/tiny_models.py): a divergence is forgiven only at a step where HF's top-2
logits differ by less than TIE_TOL = 1e-4; comparison of that request stops there.
"""

import jax
import numpy as np
import pytest

from jaxllm import LLM, SamplingParams
from jaxllm.core.policies import FCFSPolicy
from jaxllm.runner.sampling_inputs import GENERAL, GREEDY
from tests.helpers.tiny_models import assert_greedy_match, hf_greedy_with_margins, random_prompt
from tests.test_engine import VOCAB, _run, model_dir, workload  # noqa: F401 (fixtures)

# test_engine's preemption shape (24 usable blocks of 16 tokens), so compiled steps are shared.
SMALL = dict(num_kv_blocks=25, max_num_seqs=16, max_num_batched_tokens=512)
BLOCK_BYTES = 2 * 2 * 16 * 2 * 16 * 4  # K and V, 2 layers, 16 tokens, 2 KV heads of 16, fp32
GiB = 1 << 30


@pytest.fixture(scope="module")
def crowded(model_dir):  # noqa: F811
    """12 prompts of 40..120 tokens with 40 outputs each: over 3x what 24 blocks hold, so
    several requests are preempted (4 in either mode); with HF's greedy answers."""
    rng = np.random.default_rng(3)
    prompts = [random_prompt(int(n), VOCAB, seed=50 + i) for i, n in enumerate(rng.integers(40, 120, size=12))]
    expected = [hf_greedy_with_margins(model_dir, p, 40) for p in prompts]
    return prompts, expected


def greedy_params(n=40):
    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)


def generate(llm, prompts, params):
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert llm.get_stats()["kv_blocks_used"] == 0 and llm.get_stats()["cpu_blocks_used"] == 0
    llm.engine.kv_cache_manager.check_invariants()
    return [o.outputs[0].token_ids for o in outs]


def check_greedy(tokens, expected):
    for ours, (hf, margins) in zip(tokens, expected):
        assert_greedy_match(ours, hf, margins)


def test_runner_swap_round_trips_kv_exactly(model_dir):  # noqa: F811
    # max_model_len 64 -> 4 blocks per sequence -> copy buckets 1, 2, 4: 13 pairs run as 4+4+4+1.
    llm = LLM(model_dir, num_kv_blocks=40, max_model_len=64, preemption_mode="swap",
              swap_space=30 * BLOCK_BYTES / GiB)
    runner = llm.engine.runner
    assert runner.swap_buckets == (1, 2, 4) and llm.get_stats()["num_cpu_blocks"] == 29
    runner.warmup_swap()
    compiled = runner.num_compilations
    rng = np.random.default_rng(0)
    shape = runner.kv_caches[0][0].shape
    orig = [tuple(rng.standard_normal(shape).astype(np.float32) for _ in range(2)) for _ in runner.kv_caches]
    runner.kv_caches = [tuple(jax.device_put(x, c.sharding) for x, c in zip(layer, cl))
                        for layer, cl in zip(orig, runner.kv_caches)]
    device_src = rng.permutation(np.arange(1, 40))[:13]
    host_dst = rng.permutation(np.arange(1, 30))[:13]
    runner.swap(list(zip(device_src.tolist(), host_dst.tolist())), [])
    host = [tuple(np.asarray(h) for h in layer) for layer in runner.host_caches]
    untouched = np.setdiff1d(np.arange(1, 30), host_dst)
    for layer, host_layer in zip(orig, host):
        for x, h in zip(layer, host_layer):
            np.testing.assert_array_equal(h[host_dst], x[device_src])
            assert not h[untouched].any()  # padding went to scratch block 0 only
    # Back into other, permuted device blocks.
    device_dst = rng.permutation(np.arange(1, 40))[:13]
    runner.swap([], list(zip(host_dst.tolist(), device_dst.tolist())))
    others = np.setdiff1d(np.arange(1, 40), device_dst)
    for layer, kv_layer in zip(orig, runner.kv_caches):
        for x, c in zip(layer, kv_layer):
            c = np.asarray(c)
            np.testing.assert_array_equal(c[device_dst], x[device_src])
            np.testing.assert_array_equal(c[others], x[others])
    assert runner.num_compilations == compiled  # every bucket was compiled by warm-up


def test_greedy_swap_matches_transformers_and_recompute(model_dir, workload, crowded):  # noqa: F811
    swap = LLM(model_dir, **SMALL, preemption_mode="swap")
    stats = _run(swap, workload)  # test_engine's workload, each answer checked against HF
    assert stats["num_swap_outs"] > 0 and stats["num_swap_fallbacks"] == 0
    prompts, expected = crowded
    ours = generate(swap, prompts, greedy_params())
    check_greedy(ours, expected)
    stats = swap.get_stats()
    assert stats["num_swap_outs"] >= 5 and stats["num_swap_ins"] == stats["num_swap_outs"]
    assert stats["num_blocks_swapped_in"] == stats["num_blocks_swapped_out"] > 0
    recompute = LLM(model_dir, **SMALL, preemption_mode="recompute")
    theirs = generate(recompute, prompts, greedy_params())
    assert recompute.get_stats()["num_preemptions"] > 0 and recompute.get_stats()["num_swap_outs"] == 0
    for a, b, (_, margins) in zip(ours, theirs, expected):
        assert_greedy_match(a, b, margins)


def test_seeded_random_identical_in_both_modes_and_no_compilation_after_warmup(model_dir, crowded):  # noqa: F811
    prompts = crowded[0]
    params = [SamplingParams(temperature=0.9, top_p=0.95, seed=i, max_tokens=40, ignore_eos=True)
              for i in range(len(prompts))]
    swap = LLM(model_dir, **SMALL, preemption_mode="swap")
    buckets = swap.engine.resolved.token_buckets
    # The variants these requests use (greedy and random sampling), so few new steps compile.
    variants = ((GREEDY, False), (GENERAL, False))
    assert swap.engine.warmup(variants) <= len(variants) * len(buckets) + 2 * len(swap.engine.runner.swap_buckets)
    warm = swap.get_stats()["num_compilations"]
    ours = generate(swap, prompts, params)
    generate(swap, prompts, greedy_params())
    stats = swap.get_stats()
    assert stats["num_compilations"] == warm and stats["num_swap_outs"] > 0
    recompute = LLM(model_dir, **SMALL)
    assert generate(recompute, prompts, params) == ours


class SwapLong(FCFSPolicy):
    """Swap victims with at least 64 computed tokens, recompute the others."""

    def preemption_mode(self, victim):
        return "swap" if victim.num_computed_tokens >= 64 else "recompute"


def test_small_host_pool_falls_back_and_policy_may_swap(model_dir, crowded):  # noqa: F811
    prompts, expected = crowded
    # Two usable host blocks: every victim here has more computed blocks, so all recompute.
    tiny = LLM(model_dir, **SMALL, preemption_mode="swap", swap_space=3 * BLOCK_BYTES / GiB)
    check_greedy(generate(tiny, prompts, greedy_params()), expected)
    stats = tiny.get_stats()
    assert stats["num_cpu_blocks"] == 2 and stats["num_swap_outs"] == 0
    assert stats["num_swap_fallbacks"] == stats["num_preemptions"] > 0
    # A recompute engine whose policy swaps long victims: the host pool exists and is used.
    chooser = LLM(model_dir, **SMALL, scheduling_policy=SwapLong())
    records = []
    chooser.engine.add_step_observer(records.append)
    check_greedy(generate(chooser, prompts, greedy_params()), expected)
    stats = chooser.get_stats()
    assert stats["preemption_mode"] == "recompute" and stats["num_cpu_blocks"] > 0
    assert 0 < stats["num_swap_outs"] < stats["num_preemptions"]
    # Step records split preemptions by mode and count the copies each step ran.
    assert sum(r.num_preempted_swap for r in records) == stats["num_swap_outs"]
    assert sum(r.num_preempted_recompute for r in records) == stats["num_preemptions"] - stats["num_swap_outs"]
    assert sum(r.num_blocks_swapped_out for r in records) == stats["num_blocks_swapped_out"]
    assert sum(r.num_blocks_swapped_in for r in records) == stats["num_blocks_swapped_in"]
    assert all(len(r.preempted) == r.num_preempted for r in records)


def test_bad_engine_arguments_are_named(model_dir):  # noqa: F811
    with pytest.raises(ValueError, match="preemption_mode must be one of .* got 'evict'"):
        LLM(model_dir, preemption_mode="evict")
    with pytest.raises(ValueError, match="swap_space must be a number of GiB >= 0, got -1"):
        LLM(model_dir, swap_space=-1)
