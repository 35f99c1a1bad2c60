"""LLM.beam_search against transformers and against a reference beam search that follows our
(vLLM's) semantics over transformers' logits; beams share blocks through the prefix cache."""

import numpy as np
import pytest

from jaxllm import LLM, BeamSearchParams
from jaxllm.beam_search import beam_search_score
from tests.helpers.tiny_models import hf_logits, hf_model, make_tiny_model, random_prompt

VOCAB = 512


def reference_beam_search(model_dir, prompt, params: BeamSearchParams, eos_ids):
    """vLLM's algorithm over transformers' logits: [(tokens, cum_logprob, finish_reason)] best first."""
    def score(b):
        return beam_search_score(b[0], b[1], eos_ids, params.length_penalty)

    live, done = [(list(prompt), 0.0, None)], []
    for _ in range(params.max_tokens):
        candidates = []
        for tokens, cum, _ in live:
            logits = hf_logits(model_dir, tokens)[-1].astype(np.float64)
            logprobs = logits - logits.max() - np.log(np.exp(logits - logits.max()).sum())
            for t in np.argsort(-logprobs)[: 2 * params.beam_width]:
                child = (tokens + [int(t)], cum + float(logprobs[t]), None)
                if int(t) in eos_ids and not params.ignore_eos:
                    done.append((child[0], child[1], "stop"))
                else:
                    candidates.append(child)
        live = sorted(candidates, key=score, reverse=True)[: params.beam_width]
    return sorted(done + [(t, c, "length") for t, c, _ in live], key=score, reverse=True)[: params.beam_width]


def assert_same_beams(ours, reference):
    assert [s.tokens for s in ours.sequences] == [r[0] for r in reference]
    np.testing.assert_allclose([s.cum_logprob for s in ours.sequences], [r[1] for r in reference], atol=1e-4)
    assert [s.finish_reason for s in ours.sequences] == [r[2] for r in reference]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("beam"), arch="llama", seed=5)


def test_best_beam_equals_transformers_generate(model_dir):
    import torch

    llm = LLM(model_dir, block_size=8, num_kv_blocks=200, max_num_seqs=16, max_num_batched_tokens=128,
              skip_tokenizer_init=True)
    prompts = [random_prompt(n, VOCAB, seed=n) for n in (5, 23)]
    params = BeamSearchParams(beam_width=3, max_tokens=6, ignore_eos=True)
    outs = llm.beam_search([{"prompt_token_ids": p} for p in prompts], params)
    for prompt, out in zip(prompts, outs):
        assert len(out.sequences) == 3
        assert_same_beams(out, reference_beam_search(model_dir, prompt, params, (2,)))
        with torch.no_grad():
            hf = hf_model(model_dir).generate(
                torch.tensor([prompt]), num_beams=3, do_sample=False, max_new_tokens=6, min_new_tokens=6,
                length_penalty=1.0, num_return_sequences=3, pad_token_id=0)
        assert out.sequences[0].tokens == hf[0].tolist()
        assert [s.tokens for s in out.sequences] == hf.tolist()
    assert llm.get_stats()["kv_blocks_used"] == 0


def test_eos_and_length_penalty_follow_vllm_semantics(tmp_path):
    # A model whose EOS is a token the beams often propose, so some beams complete early.
    base = make_tiny_model(tmp_path, arch="llama", seed=6, name="base")
    prompt = random_prompt(17, VOCAB, seed=3)
    eos = int(np.argsort(-hf_logits(base, prompt)[-1])[2])  # the third most likely first token
    model_dir = make_tiny_model(tmp_path, arch="llama", seed=6, name="eos", eos_token_id=eos)
    llm = LLM(model_dir, block_size=8, num_kv_blocks=200, max_num_seqs=16, max_num_batched_tokens=128,
              skip_tokenizer_init=True)
    for length_penalty in (1.0, 0.3, 2.0):
        params = BeamSearchParams(beam_width=4, max_tokens=5, length_penalty=length_penalty)
        out = llm.beam_search({"prompt_token_ids": prompt}, params)[0]
        reference = reference_beam_search(model_dir, prompt, params, (eos,))
        assert_same_beams(out, reference)
        assert any(s.finish_reason == "stop" and s.tokens[-1] == eos for s in out.sequences) or length_penalty == 2.0
    assert "stop" in {r[2] for r in reference_beam_search(model_dir, prompt, BeamSearchParams(4, 5), (eos,))}


def test_beams_share_blocks_through_the_prefix_cache(model_dir):
    # 4 beams of a 200-token prompt need 4 x 26 = 104 blocks of 8 unshared; the cache holds 59.
    # Shared through the prefix cache they need ~25 + 4 x 2, so nothing is ever preempted.
    prompt = random_prompt(200, VOCAB, seed=9)
    llm = LLM(model_dir, block_size=8, num_kv_blocks=60, max_num_seqs=8, max_num_batched_tokens=256,
              skip_tokenizer_init=True)
    out = llm.beam_search({"prompt_token_ids": prompt}, BeamSearchParams(beam_width=4, max_tokens=8, ignore_eos=True))
    stats = llm.get_stats()
    assert stats["num_preemptions"] == 0 and stats["prefix_cache_hits"] > 0 and stats["kv_blocks_used"] == 0
    assert len(out[0].sequences) == 4 and all(len(s.tokens) == 208 for s in out[0].sequences)


def test_bad_beam_search_input_names_the_value(model_dir):
    for kwargs, field in [(dict(beam_width=0, max_tokens=4), "beam_width"),
                          (dict(beam_width=11, max_tokens=4), "beam_width"),
                          (dict(beam_width=2.0, max_tokens=4), "beam_width"),
                          (dict(beam_width=2, max_tokens=0), "max_tokens"),
                          (dict(beam_width=2, max_tokens=4, temperature=-1.0), "temperature"),
                          (dict(beam_width=2, max_tokens=4, length_penalty=float("nan")), "length_penalty")]:
        with pytest.raises(ValueError, match=rf"^{field} must"):
            BeamSearchParams(**kwargs)
    llm = LLM(model_dir, block_size=8, num_kv_blocks=40, max_num_seqs=8, max_num_batched_tokens=64,
              skip_tokenizer_init=True)
    with pytest.raises(ValueError, match="must be a BeamSearchParams"):
        llm.beam_search({"prompt_token_ids": [5, 6]}, {"beam_width": 2})
    with pytest.raises(ValueError, match="prompt 1: the prompt is empty"):
        llm.beam_search([{"prompt_token_ids": [5, 6]}, {"prompt_token_ids": []}], BeamSearchParams(2, 3))
    with pytest.raises(ValueError, match="prompt 0: n=8 samples need"):
        llm.beam_search({"prompt_token_ids": random_prompt(200, VOCAB)}, BeamSearchParams(8, 40))
    assert not llm.engine.has_unfinished_requests()
