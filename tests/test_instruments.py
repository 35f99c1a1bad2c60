"""Hidden-state capture and residual interventions (jaxllm/runner/instrument_inputs.py) against
transformers: output_hidden_states=True, and a forward pre-hook adding the same vector.

One engine shape for the module (one 64-token bucket, 24 KV blocks) keeps compilation short.
"""

import numpy as np
import pytest

from jaxllm import LLM, SamplingParams
from jaxllm.runner.step_io import MAX_STEP_VARIANTS_PER_BUCKET
from tests.helpers.tiny_models import hf_model, make_tiny_model, random_prompt

VOCAB, HIDDEN, LAYERS = 512, 64, 2
ENGINE = dict(num_kv_blocks=24, max_num_seqs=4, max_num_batched_tokens=64, token_buckets=(64,),
              skip_tokenizer_init=True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("instruments"), arch="llama")


def greedy(n, **kw):
    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, **kw)


def ids(n, seed):
    return {"prompt_token_ids": random_prompt(n, VOCAB, seed=seed)}


def hf_hidden_states(path, token_ids, interventions=None):
    """transformers' (hidden_states [L + 1, T, H], logits [T, V]), with `interventions` added by
    forward pre-hooks at the input of their layers."""
    import torch

    model = hf_model(path)
    handles = []
    for layer, v in (interventions or {}).items():
        vec = torch.tensor(np.asarray(v, np.float32))

        def pre_hook(module, args, kwargs, vec=vec):
            if args:
                return (args[0] + vec, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": kwargs["hidden_states"] + vec}

        handles.append(model.model.layers[layer].register_forward_pre_hook(pre_hook, with_kwargs=True))
    try:
        with torch.no_grad():
            out = model(input_ids=torch.tensor([list(token_ids)]), output_hidden_states=True)
    finally:
        for h in handles:
            h.remove()
    return np.stack([h[0].numpy() for h in out.hidden_states]), out.logits[0].numpy()


def hf_greedy(path, prompt, n, interventions=None):
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(np.argmax(hf_hidden_states(path, seq, interventions)[1][-1])))
    return seq[len(prompt):]


def test_hidden_states_match_transformers_in_a_mixed_chunked_batch(model_dir):
    llm = LLM(model_dir, **ENGINE)
    prompt = ids(150, seed=1)  # three chunks of the 64-token budget
    asked = [0, 1, -1]
    params = [greedy(6, output_hidden_states=asked), greedy(5), greedy(7, logprobs=2)]
    outs = llm.generate([prompt, ids(40, seed=2), ids(90, seed=3)], params, use_tqdm=False)
    out = outs[0]
    comp = out.outputs[0]
    assert out.prompt_hidden_states.shape == (150, 3, HIDDEN)
    assert comp.hidden_states.shape == (5, 3, HIDDEN)  # the last generated token is never fed
    assert outs[1].prompt_hidden_states is None and outs[1].outputs[0].hidden_states is None
    seq = prompt["prompt_token_ids"] + comp.token_ids[:-1]
    ref, _ = hf_hidden_states(model_dir, seq)  # [L + 1, T, H]
    ours = np.concatenate([out.prompt_hidden_states, comp.hidden_states])  # [T, 3, H]
    want = ref[[0, 1, LAYERS]].transpose(1, 0, 2)
    np.testing.assert_allclose(ours, want, atol=1e-5, rtol=1e-5)
    assert comp.token_ids == hf_greedy(model_dir, prompt["prompt_token_ids"], 6)


def test_capture_survives_preemption_and_prefix_cache(model_dir):
    # 23 usable blocks of 16 tokens: four 80-token prompts growing to 110 tokens cannot all stay.
    llm = LLM(model_dir, **ENGINE)
    prompts = [ids(80, seed=s) for s in (4, 5, 6, 11)]
    outs = llm.generate(prompts, [greedy(30, output_hidden_states=[-1])] * 4, use_tqdm=False)
    assert llm.get_stats()["num_preemptions"] > 0
    # The same prompt again, its blocks now cached: still every prompt token's states.
    again = llm.generate(prompts[:1], greedy(2, output_hidden_states=[-1]), use_tqdm=False)[0]
    for out, p in zip(outs, prompts):
        comp = out.outputs[0]
        seq = p["prompt_token_ids"] + comp.token_ids[:-1]
        ref, _ = hf_hidden_states(model_dir, seq)
        got = np.concatenate([out.prompt_hidden_states, comp.hidden_states])[:, 0]
        np.testing.assert_allclose(got, ref[LAYERS], atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(again.prompt_hidden_states, outs[0].prompt_hidden_states)


def test_interventions(model_dir):
    prompt, other = ids(70, seed=7), ids(20, seed=8)
    # A zero intervention changes nothing, bitwise (tokens and logprobs), in the same company and
    # the same step shapes (no prefix cache: a hit would change the steps' token buckets, and
    # with them the float rounding of the default mode; see batch_invariant).
    uncached = LLM(model_dir, **ENGINE, enable_prefix_caching=False)
    plain = uncached.generate([prompt, other], [greedy(6, logprobs=3)] * 2, use_tqdm=False)
    zeros = {0: np.zeros(HIDDEN, np.float32), 1: np.zeros(HIDDEN)}
    zero = uncached.generate([prompt, other], [greedy(6, logprobs=3, residual_interventions=zeros),
                                               greedy(6, logprobs=3)], use_tqdm=False)

    def lps(out):
        c = out.outputs[0]
        return c.token_ids, [e[t].logprob for e, t in zip(c.logprobs, c.token_ids)]

    assert lps(zero[0]) == lps(plain[0]) and lps(zero[1]) == lps(plain[1])

    # A steering vector equals transformers with a pre-hook adding it at layer 1; the request
    # beside it is untouched, and the prefix cache (the plain run filled it) serves neither
    # the wrong K/V.
    llm = LLM(model_dir, **ENGINE)
    llm.generate([prompt, other], [greedy(6)] * 2, use_tqdm=False)  # fills the prefix cache
    vec = np.random.default_rng(0).normal(0, 2.0, HIDDEN).astype(np.float32)
    steered = llm.generate([prompt, other], [greedy(6, residual_interventions={-1: vec}, logprobs=5),
                                             greedy(6, logprobs=3)], use_tqdm=False)
    comp = steered[0].outputs[0]
    p = prompt["prompt_token_ids"]
    assert comp.token_ids == hf_greedy(model_dir, p, 6, {1: vec})
    assert comp.token_ids != plain[0].outputs[0].token_ids  # the vector matters for this model
    # Logits (as logprobs of the top 5 at every generated position) equal transformers'.
    _, logits = hf_hidden_states(model_dir, p + comp.token_ids[:-1], {1: vec})
    logits = logits[len(p) - 1:].astype(np.float64)
    ref = logits - logits.max(-1, keepdims=True)
    ref -= np.log(np.exp(ref).sum(-1, keepdims=True))
    for step, entry in enumerate(comp.logprobs):
        top = sorted(entry, key=lambda t: entry[t].rank or 99)[:5]
        np.testing.assert_allclose([entry[t].logprob for t in top], ref[step, top], atol=1e-4)
    assert steered[1].outputs[0].token_ids == plain[1].outputs[0].token_ids
    # Captured states see the intervention downstream (layer 2 = after layer 1 saw the vector).
    both = llm.generate(prompt, greedy(2, residual_interventions={1: vec}, output_hidden_states=[1, 2]),
                        use_tqdm=False)[0]
    ref, _ = hf_hidden_states(model_dir, p + both.outputs[0].token_ids[:1], {1: vec})
    np.testing.assert_allclose(both.prompt_hidden_states, ref[[1, 2], :len(p)].transpose(1, 0, 2), atol=1e-5)
    stats = llm.get_stats()
    assert stats["num_step_variants"] <= MAX_STEP_VARIANTS_PER_BUCKET


def test_warmed_instrumented_steps_do_not_compile(model_dir):
    llm = LLM(model_dir, **ENGINE)
    llm.engine.warmup(instrumented=True)
    warm = llm.get_stats()["num_compilations"]
    gen = SamplingParams(temperature=0.9, seed=3, max_tokens=4, residual_interventions={0: np.ones(HIDDEN)})
    llm.generate([ids(30, seed=9), ids(5, seed=10)], [gen, greedy(3, prompt_logprobs=1)], use_tqdm=False)
    stats = llm.get_stats()
    assert stats["num_compilations"] == warm  # interventions are data (no capture: no gather)
    assert stats["num_step_variants"] == MAX_STEP_VARIANTS_PER_BUCKET  # warm-up ran them all


@pytest.mark.parametrize("params, match", [
    (dict(output_hidden_states=[3]), "output_hidden_states index 3"),
    (dict(output_hidden_states=[-4]), "output_hidden_states index -4"),
    (dict(residual_interventions={2: np.zeros(HIDDEN)}), "layer 2 does not exist"),
    (dict(residual_interventions={0: np.zeros(HIDDEN + 1)}), "has 65 values"),
])
def test_bad_instruments_are_refused_by_the_engine(model_dir, params, match):
    llm = LLM(model_dir, **ENGINE)
    with pytest.raises(ValueError, match=match):
        llm.engine.add_request("bad", ids(5, seed=0), greedy(2, **params))
    assert not llm.engine.has_unfinished_requests()
    assert llm.generate(ids(5, seed=0), greedy(2), use_tqdm=False)[0].error is None


@pytest.mark.parametrize("params, match", [
    (dict(output_hidden_states=1), "list of layer indices"),
    (dict(output_hidden_states=[]), "non-empty"),
    (dict(output_hidden_states=[0.5]), "int layer indices"),
    (dict(residual_interventions=[np.zeros(4)]), "dict"),
    (dict(residual_interventions={"0": np.zeros(4)}), "must be ints"),
    (dict(residual_interventions={0: np.zeros(4, np.int32)}), "dtype int32"),
    (dict(residual_interventions={0: np.zeros((2, 4))}), r"shape \(2, 4\)"),
    (dict(residual_interventions={0: np.array([np.nan])}), "non-finite"),
])
def test_bad_instrument_params(params, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**params)
