"""The engine with attention_backend="pallas": same greedy tokens as the reference backend
(kernel in interpret mode on CPU), and the whole engine step lowers to Mosaic for TPU and CUDA."""

import functools

import numpy as np

import jax
import pytest
from jax.sharding import AbstractDevice, AbstractMesh

from jaxllm import LLM, SamplingParams
from jaxllm.attention import pallas as pallas_attention
from jaxllm.runner.runner import attention_impl, paged_step
from tests.helpers.tiny_models import make_tiny_model, random_prompt

TPU_MESH = AbstractMesh((1,), ("x",), abstract_device=AbstractDevice(
    device_kind="TPU v5 lite", num_cores=1, platform="tpu"))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    # head_dim 64 so the GPU kernel (head_dim % 64 == 0) is the one lowered for cuda.
    return make_tiny_model(tmp_path_factory.mktemp("pallas"), arch="llama", hidden_size=128,
                           num_attention_heads=2, num_key_value_heads=1)


def _generate(model_dir, backend, dtype="float32"):
    llm = LLM(model_dir, dtype=dtype, attention_backend=backend, block_size=8, num_kv_blocks=32,
              max_num_seqs=4, max_num_batched_tokens=32)
    prompts = [{"prompt_token_ids": random_prompt(n, 512, seed=n)} for n in (3, 9, 40)]
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    return llm, [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


def test_pallas_backend_matches_reference_greedy(model_dir):
    # Mixed batches: the 40-token prompt is chunked (32-token budget) while the others decode.
    ref_llm, ref = _generate(model_dir, "reference")
    pallas_llm, pallas = _generate(model_dir, "pallas")
    assert pallas == ref
    # What ran, as step tables record it (jaxllm.sim.fit fits a cost model to that attention).
    assert (ref_llm.get_stats()["attention_backend"], pallas_llm.get_stats()["attention_backend"]) == \
        ("reference", "pallas")


@pytest.mark.parametrize("batch_invariant", [False, True])
@pytest.mark.parametrize("platform, marker", [("tpu", "tpu_custom_call"), ("cuda", "mosaic_gpu")])
def test_engine_step_exports_to_mosaic(model_dir, platform, marker, batch_invariant):
    llm = LLM(model_dir, dtype="bfloat16", attention_backend="pallas", block_size=8,
              num_kv_blocks=16, max_num_seqs=4, max_num_batched_tokens=16, batch_invariant=batch_invariant)
    engine = llm.engine
    engine.add_request("a", {"prompt_token_ids": random_prompt(11, 512, seed=1)},
                       SamplingParams(temperature=0.0, max_tokens=2))
    plan = engine.scheduler.schedule()
    inputs = engine.build_step_inputs(plan.scheduled)
    step = functools.partial(paged_step, config=engine.runner.config, attention_fn=attention_impl("pallas", batch_invariant),
                             sampler=inputs.sampler, prompt_logprobs=inputs.prompt_logprobs)
    args = (engine.runner.params, engine.runner.kv_caches, *engine.runner.device_args(inputs))
    if platform == "tpu":
        with jax.sharding.use_abstract_mesh(TPU_MESH):
            exported = jax.export.export(jax.jit(step), platforms=[platform])(*args)
    else:
        exported = jax.export.export(jax.jit(step), platforms=[platform])(*args)
    text = exported.mlir_module()
    assert marker in text


def test_pallas_batch_invariant_logprobs_bitwise_alone_batched_chunked(model_dir):
    """batch_invariant=True on the Pallas backend (kernel in interpret mode): a request's tokens
    and top-5 logprobs are bitwise the same alone, next to other requests, and prefilled in two
    chunks next to a decode; and they agree with the invariant reference attention."""
    # One token bucket and one sampler: one compile per backend (interpret mode compiles slowly).
    engine = dict(block_size=8, num_kv_blocks=32, max_num_seqs=4, token_buckets=(16,),
                  skip_tokenizer_init=True, batch_invariant=True)
    target = {"prompt_token_ids": random_prompt(13, 512, seed=3)}
    params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True, logprobs=5)
    others = [{"prompt_token_ids": random_prompt(n, 512, seed=n)} for n in (2, 5)]
    other_params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)

    def record(llm, company=()):
        outs = llm.generate(list(company) + [target], [other_params] * len(company) + [params], use_tqdm=False)
        comp = outs[-1].outputs[0]
        return comp.token_ids, [sorted((t, e.logprob) for t, e in lp.items()) for lp in comp.logprobs]

    wide = LLM(model_dir, attention_backend="pallas", max_num_batched_tokens=16, **engine)
    assert wide.engine.runner._attention_fn is pallas_attention.batch_invariant_ragged_paged_attention
    alone = record(wide)
    assert record(wide, others) == alone
    narrow = LLM(model_dir, attention_backend="pallas", max_num_batched_tokens=8, **engine)  # 2 chunks
    assert record(narrow, others[:1]) == alone
    ref_tokens, ref_logprobs = record(LLM(model_dir, max_num_batched_tokens=16, **engine))
    assert ref_tokens == alone[0]
    np.testing.assert_allclose([lp for step in ref_logprobs for _, lp in step],
                               [lp for step in alone[1] for _, lp in step], atol=1e-5)
