"""SamplingParams(n > 1): one RequestOutput with n completions (index 0..n-1), sample i seeded
with seed + i (vLLM), stops / logprobs / max_tokens per sample, greedy samples equal to
transformers, abort of the whole request, refusal of n samples that could never fit together."""

import numpy as np
import pytest

from jaxllm import LLM, SamplingParams
from tests.helpers.tiny_models import assert_greedy_match, hf_greedy_with_margins, make_tiny_model, random_prompt

VOCAB = 512


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("n"), arch="qwen2", seed=4)


@pytest.fixture(scope="module")
def llm(model_dir):
    return LLM(model_dir, block_size=8, num_kv_blocks=120, max_num_seqs=8, max_num_batched_tokens=64,
               skip_tokenizer_init=True)


def ids(n, seed):
    return {"prompt_token_ids": random_prompt(n, VOCAB, seed=seed)}


def test_greedy_samples_all_equal_transformers(llm, model_dir):
    prompt = random_prompt(37, VOCAB, seed=1)
    expected, margins = hf_greedy_with_margins(model_dir, prompt, 7)
    out = llm.generate({"prompt_token_ids": prompt}, SamplingParams(n=3, temperature=0.0, max_tokens=7,
                                                                    ignore_eos=True), use_tqdm=False)
    assert len(out) == 1 and out[0].request_id == "0" and out[0].finished
    assert [c.index for c in out[0].outputs] == [0, 1, 2]
    for c in out[0].outputs:
        assert_greedy_match(c.token_ids, expected, margins)
        assert c.finish_reason == "length"
    assert llm.get_stats()["kv_blocks_used"] == 0


def test_seeded_sample_i_equals_a_single_request_with_seed_plus_i(llm):
    params = SamplingParams(n=4, temperature=1.0, top_p=0.95, seed=100, max_tokens=12, ignore_eos=True,
                            logprobs=2)
    together = llm.generate([ids(20, 2), ids(50, 3)], params, use_tqdm=False)
    for prompt, out in zip([ids(20, 2), ids(50, 3)], together):
        assert [c.index for c in out.outputs] == [0, 1, 2, 3]
        for i, completion in enumerate(out.outputs):
            alone = SamplingParams(temperature=1.0, top_p=0.95, seed=100 + i, max_tokens=12, ignore_eos=True)
            single = llm.generate(prompt, alone, use_tqdm=False)[0].outputs[0]
            assert completion.token_ids == single.token_ids, i
            assert len(completion.logprobs) == 12  # per-sample logprobs
        # Different seeds really give different samples (the test would be vacuous otherwise).
        assert len({tuple(c.token_ids) for c in out.outputs}) > 1


def test_stops_and_max_tokens_apply_per_sample(llm):
    # Unseeded samples diverge; a stop token ends each sample on its own, max_tokens caps the rest.
    probe = llm.generate(ids(10, 4), SamplingParams(n=6, temperature=1.5, max_tokens=20, ignore_eos=True,
                                                    seed=7), use_tqdm=False)[0]
    stop_token = probe.outputs[0].token_ids[3]
    out = llm.generate(ids(10, 4), SamplingParams(n=6, temperature=1.5, max_tokens=20, ignore_eos=True, seed=7,
                                                  stop_token_ids=[stop_token]), use_tqdm=False)[0]
    reasons = [c.finish_reason for c in out.outputs]
    assert out.outputs[0].finish_reason == "stop" and len(out.outputs[0].token_ids) == 4
    for c in out.outputs:
        assert (c.finish_reason == "stop") == (stop_token in c.token_ids), reasons
        assert len(c.token_ids) <= 20


def test_engine_step_reports_one_output_per_request(llm):
    engine = llm.engine
    engine.add_request("multi", ids(12, 5), SamplingParams(n=3, temperature=0.0, max_tokens=4, ignore_eos=True))
    engine.add_request("single", ids(12, 6), SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True))
    seen, last = [], {}
    while engine.has_unfinished_requests():
        outs = engine.step()
        step_ids = [o.request_id for o in outs]
        assert len(step_ids) == len(set(step_ids))  # one output per request per step
        seen += step_ids
        last.update((o.request_id, o) for o in outs)
    assert set(seen) == {"multi", "single"}
    assert [len(c.token_ids) for c in last["multi"].outputs] == [4, 4, 4] and last["multi"].finished


def test_abort_stops_every_sample_and_frees_blocks(llm):
    engine = llm.engine
    engine.add_request("x", ids(30, 8), SamplingParams(n=4, temperature=0.8, max_tokens=30, ignore_eos=True))
    engine.step()
    stats = llm.get_stats()
    assert stats["num_running"] >= 2 and stats["num_running"] + stats["num_waiting"] == 4
    engine.abort_request("x")
    assert not engine.has_unfinished_requests() and llm.get_stats()["kv_blocks_used"] == 0
    engine.add_request("y", ids(30, 8), SamplingParams(n=2, temperature=0.8, max_tokens=30, ignore_eos=True))
    engine.step()
    engine.abort_request("1_y")  # one sample's id aborts the whole request
    assert not engine.has_unfinished_requests() and llm.get_stats()["kv_blocks_used"] == 0


def test_samples_share_the_prompt_blocks_through_the_prefix_cache(model_dir):
    llm = LLM(model_dir, block_size=8, num_kv_blocks=120, max_num_seqs=8, max_num_batched_tokens=128,
              skip_tokenizer_init=True)
    engine = llm.engine
    engine.add_request("s", ids(64, 11), SamplingParams(n=4, temperature=0.0, max_tokens=3, ignore_eos=True))
    engine.step()
    # Sample 0 computes the 8 prompt blocks; samples 1-3, admitted in the same step, find its
    # first 7 and compute only the block with the last prompt token: 8 + 3 blocks, not 32.
    assert llm.get_stats()["kv_blocks_used"] == 11
    while engine.has_unfinished_requests():
        outs = engine.step()
    assert len({tuple(c.token_ids) for c in outs[0].outputs}) == 1 and outs[0].num_cached_tokens == 0


def test_bad_n_and_samples_that_can_never_fit_together(llm):
    engine = llm.engine
    for bad in (0, -1, 2.5):
        with pytest.raises(ValueError, match=rf"^n must be an int.*{bad!r}"):
            SamplingParams(n=bad)
    # 119 usable blocks of 8: a sample of 300 prompt + 100 output tokens needs 50 blocks; three
    # share the prompt's 37 full blocks and need 37 + 3 * 13 = 76 together; ten need 167.
    with pytest.raises(ValueError, match=r"n=10 samples need 167 KV blocks together"):
        engine.add_request("big", ids(300, 9), SamplingParams(n=10, max_tokens=101))
    engine.add_request("ok", ids(300, 9), SamplingParams(n=3, max_tokens=101))
    engine.abort_request("ok")
    no_cache = LLM(llm.engine.config.model, block_size=8, num_kv_blocks=120, max_num_seqs=8,
                   max_num_batched_tokens=64, skip_tokenizer_init=True, enable_prefix_caching=False)
    with pytest.raises(ValueError, match=r"n=3 samples need 150 KV blocks together \(50 each, 0 shared\)"):
        no_cache.engine.add_request("big", ids(300, 9), SamplingParams(n=3, max_tokens=101))
    assert not engine.has_unfinished_requests()
    # An id taken by a sample of another request is refused by name.
    engine.add_request("z", ids(5, 1), SamplingParams(n=2, max_tokens=2))
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("0_z", ids(5, 1), SamplingParams(max_tokens=2))
    engine.abort_request("z")
