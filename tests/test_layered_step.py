"""EngineConfig.compilation="layered" (embedding, one decoder-layer executable dispatched once per
layer, head + sampling; jaxllm/runner/runner.py) against the fused step: tokens identical and
logprobs within 1e-5 on tiny Llama (GQA) and Gemma 3 (sliding and global layers: two layer
executables), in batch-invariant mode too, and with hidden-state capture and interventions;
executables counted per bucket; the refused configurations.

One engine shape (one 64-token bucket) keeps compilation short.
"""

import numpy as np
import pytest

from jaxllm import LLM, SamplingParams
from jaxllm.config import EngineConfig, ParallelConfig
from jaxllm.runner.step_io import STEP_VARIANTS
from tests.helpers.tiny_models import make_tiny_model, random_prompt

VOCAB, TOL = 512, 1e-5
ENGINE = dict(num_kv_blocks=40, max_num_seqs=4, max_num_batched_tokens=64, token_buckets=(64,),
              skip_tokenizer_init=True, compile_cache_dir=None)
# Three prompts (the 90-token one in two chunks) under the step variants: greedy with logprobs
# and prompt logprobs, seeded sampling with penalties, plain greedy.
PROMPTS = [{"prompt_token_ids": random_prompt(n, VOCAB, seed=n)} for n in (3, 20, 90)]
PARAMS = [
    SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=5, prompt_logprobs=5),
    SamplingParams(temperature=0.8, top_p=0.9, seed=3, repetition_penalty=1.2, max_tokens=7, ignore_eos=True,
                   logprobs=3),
    SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True, logprobs=0),
]


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("layered")
    return {"llama": make_tiny_model(root, "llama", name="llama", num_key_value_heads=2),
            "gemma3": make_tiny_model(root, "gemma3", name="gemma3")}  # windows (48, None, 48, None)


@pytest.fixture(scope="module")
def engines(model_dirs):
    """(arch, mode) -> LLM, shared by the tests (each compiles its variants once)."""
    return {(arch, mode): LLM(path, compilation=mode, **ENGINE)
            for arch, path in model_dirs.items() for mode in ("fused", "layered")}


def _logprob_rows(out):
    """Every (position, token) -> logprob an output reports: sampled, top and prompt entries."""
    rows = {}
    for pos, entry in enumerate(out.outputs[0].logprobs or []):
        rows.update({("out", pos, t): e.logprob for t, e in entry.items()})
    for pos, entry in enumerate(out.prompt_logprobs or []):
        rows.update({("prompt", pos, t): e.logprob for t, e in (entry or {}).items()})
    return rows


def assert_same_outputs(fused, layered):
    compared = 0
    for a, b in zip(fused, layered):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        ra, rb = _logprob_rows(a), _logprob_rows(b)
        assert ra.keys() == rb.keys()
        np.testing.assert_allclose([rb[k] for k in ra], list(ra.values()), atol=TOL, rtol=0)
        compared += len(ra)
    assert compared  # some request reported logprobs


@pytest.mark.parametrize("arch, layer_programs", [("llama", 1), ("gemma3", 2)])
def test_layered_equals_fused_and_counts_its_executables(engines, arch, layer_programs):
    fused, layered = engines[arch, "fused"], engines[arch, "layered"]
    runner = layered.engine.runner
    # Embedding, one decoder layer per signature, the row selection, one head per step variant.
    per_bucket = runner.step_executables_per_bucket(STEP_VARIANTS)
    assert per_bucket == 1 + layer_programs + 1 + len(STEP_VARIANTS)  # + the row selection
    assert fused.engine.runner.step_executables_per_bucket(STEP_VARIANTS) == len(STEP_VARIANTS)
    before = layered.get_stats()["num_executables"]
    assert layered.engine.warmup() == per_bucket  # one bucket
    assert layered.get_stats()["num_executables"] == before + per_bucket
    warm = layered.get_stats()["num_compilations"]
    assert_same_outputs(fused.generate(PROMPTS, PARAMS, use_tqdm=False),
                        layered.generate(PROMPTS, PARAMS, use_tqdm=False))
    assert layered.get_stats()["num_compilations"] == warm  # steady state compiles nothing
    assert not runner.kv_cache_lost()


def test_layered_batch_invariant_equals_fused_and_is_invariant(model_dirs):
    path = model_dirs["llama"]
    fused = LLM(path, compilation="fused", batch_invariant=True, **ENGINE)
    layered = LLM(path, compilation="layered", batch_invariant=True, **ENGINE)
    greedy = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=5)
    together = layered.generate(PROMPTS, [greedy] * 3, use_tqdm=False)
    assert_same_outputs(fused.generate(PROMPTS, [greedy] * 3, use_tqdm=False), together)
    # The row tiles are inside the layer program: a request alone is bitwise the batched one.
    alone = layered.generate(PROMPTS[2], greedy, use_tqdm=False)[0]
    assert alone.outputs[0].token_ids == together[2].outputs[0].token_ids
    assert _logprob_rows(alone) == _logprob_rows(together[2])


def test_layered_hidden_states_and_interventions_equal_fused(engines):
    llms = {mode: engines["gemma3", mode] for mode in ("fused", "layered")}
    hidden = llms["fused"].engine.model_config.hidden_size
    vec = np.random.default_rng(0).normal(0, 2.0, hidden).astype(np.float32)
    params = [SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True, logprobs=3,
                             output_hidden_states=[0, 2, -1], residual_interventions={1: vec, -1: -vec}),
              SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True, logprobs=3),
              SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True, output_hidden_states=[3])]
    outs = {}
    for mode, llm in llms.items():
        outs[mode] = llm.generate(PROMPTS, params, use_tqdm=False)
        assert any(v[3] for v in llm.engine.runner.step_variants_used)  # instrumented steps ran
        # Again (from the prefix cache now): at most the new capture sizes' gathers compile.
        warm, gathers = llm.get_stats()["num_compilations"], len(llm.engine.runner.gather_variants_used)
        again = llm.generate(PROMPTS, params, use_tqdm=False)
        assert llm.get_stats()["num_compilations"] - warm <= len(llm.engine.runner.gather_variants_used) - gathers
        assert [o.outputs[0].token_ids for o in again] == [o.outputs[0].token_ids for o in outs[mode]]
    assert_same_outputs(outs["fused"], outs["layered"])
    for a, b in zip(outs["fused"], outs["layered"]):
        for got, want in ((b.prompt_hidden_states, a.prompt_hidden_states),
                          (b.outputs[0].hidden_states, a.outputs[0].hidden_states)):
            assert (got is None) == (want is None)
            if want is not None:
                np.testing.assert_allclose(got, want, atol=TOL, rtol=TOL)
    assert outs["layered"][0].prompt_hidden_states.shape == (3, 3, hidden)


def test_compilation_option_is_validated():
    with pytest.raises(ValueError, match=r"compilation must be one of .* got 'scan'"):
        EngineConfig(model="m", compilation="scan")
    with pytest.raises(ValueError, match=r"compilation='layered' needs pipeline_parallel_size=1.* got 2"):
        EngineConfig(model="m", compilation="layered", parallel=ParallelConfig(pipeline_parallel_size=2))
    # The default: layered, except under pipeline parallelism (its tick is fused).
    assert EngineConfig(model="m").compilation == "layered"
    assert EngineConfig(model="m", parallel=ParallelConfig(pipeline_parallel_size=2)).compilation == "fused"
