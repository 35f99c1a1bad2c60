"""The engine with attention_backend="pallas": same greedy tokens as the reference backend
(kernel in interpret mode on CPU), and the whole engine step lowers to Mosaic for TPU and CUDA."""

import functools

import jax
import pytest
from jax.sharding import AbstractDevice, AbstractMesh

from jaxllm import LLM, SamplingParams
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
    _, ref = _generate(model_dir, "reference")
    _, pallas = _generate(model_dir, "pallas")
    assert pallas == ref


@pytest.mark.parametrize("platform, marker", [("tpu", "tpu_custom_call"), ("cuda", "mosaic_gpu")])
def test_engine_step_exports_to_mosaic(model_dir, platform, marker):
    llm = LLM(model_dir, dtype="bfloat16", attention_backend="pallas", block_size=8,
              num_kv_blocks=16, max_num_seqs=4, max_num_batched_tokens=16)
    engine = llm.engine
    engine.add_request("a", {"prompt_token_ids": random_prompt(11, 512, seed=1)},
                       SamplingParams(temperature=0.0, max_tokens=2))
    plan = engine.scheduler.schedule()
    inputs = engine.build_step_inputs(plan.scheduled)
    step = functools.partial(paged_step, config=engine.runner.config, attention_fn=attention_impl("pallas"),
                             sampler=inputs.sampler, prompt_logprobs=inputs.prompt_logprobs)
    args = (engine.runner.params, engine.runner.kv_caches, *engine.runner.device_args(inputs))
    if platform == "tpu":
        with jax.sharding.use_abstract_mesh(TPU_MESH):
            exported = jax.export.export(jax.jit(step), platforms=[platform])(*args)
    else:
        exported = jax.export.export(jax.jit(step), platforms=[platform])(*args)
    text = exported.mlir_module()
    assert marker in text
