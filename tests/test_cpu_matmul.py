"""jaxllm.models.packed (the C++ matmul over packed weights, through the XLA FFI) against numpy
float64 and its jnp twin, and the engine with matmul_backend="cpu" against "xla"."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from jaxllm import LLM, SamplingParams
from jaxllm.config import EngineConfig, ParallelConfig
from jaxllm.models import packed
from tests.helpers.tiny_models import make_tiny_model, random_prompt

pytestmark = pytest.mark.skipif(not packed.available(), reason=f"no CPU matmul kernel: {packed.unavailable_reason()}")


def _weights(k, n, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((k, n)).astype(np.float32)


@pytest.mark.parametrize("m, k, n", [(1, 64, 48), (3, 7, 5), (8, 576, 192), (13, 96, 200), (64, 33, 97),
                                     (130, 128, 96)])
def test_kernel_matches_float64_and_reference(m, k, n):
    # Row counts off the 8-row micro-tile and the 64-row work item, columns off the panel width.
    w = _weights(k, n)
    x = np.random.default_rng(1).standard_normal((m, k)).astype(np.float32)
    pw = packed.pack(jnp.asarray(w))
    got = np.asarray(jax.jit(packed.packed_matmul)(jnp.asarray(x), pw))
    want = x.astype(np.float64) @ w.astype(np.float64)
    scale = np.abs(x).astype(np.float64) @ np.abs(w).astype(np.float64)
    assert got.shape == (m, n)
    assert np.all(np.abs(got - want) <= 1e-5 * scale + 1e-6)
    ref = np.asarray(jax.jit(packed.packed_matmul_reference)(jnp.asarray(x), pw))
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * float(scale.max()))


def test_pack_unpack_roundtrip_and_padding_never_read():
    w = _weights(40, 101)
    pw = packed.pack(jnp.asarray(w))
    panel = packed.panel_width()
    assert pw.panels.shape == (-(-101 // panel), 40, panel) and pw.out_features == 101
    np.testing.assert_array_equal(np.asarray(packed.unpack(pw)), w)
    # NaN in the last panel's spare columns: the kernel computes them but writes only real columns.
    spare = np.asarray(pw.panels).copy()
    spare[-1, :, 101 - (spare.shape[0] - 1) * panel:] = np.nan
    x = jnp.asarray(np.random.default_rng(2).standard_normal((9, 40)).astype(np.float32))
    out = np.asarray(jax.jit(packed.packed_matmul)(x, packed.PackedWeight(jnp.asarray(spare), 101)))
    assert np.isfinite(out).all()
    np.testing.assert_array_equal(out, np.asarray(jax.jit(packed.packed_matmul)(x, pw)))


def test_each_row_is_bitwise_the_same_whatever_the_row_count_and_position():
    w = jnp.asarray(_weights(96, 150))
    pw = packed.pack(w)
    x = np.random.default_rng(3).standard_normal((100, 96)).astype(np.float32)
    mm = jax.jit(packed.packed_matmul)
    alone = np.asarray(mm(jnp.asarray(x[17:18]), pw))
    for rows in (slice(10, 27), slice(0, 64), slice(17, 100), slice(5, 90)):
        got = np.asarray(mm(jnp.asarray(x[rows]), pw))
        np.testing.assert_array_equal(got[17 - rows.start], alone[0])


@pytest.fixture(scope="module", params=[False, True], ids=["lm_head", "tied"])
def model_dir(tmp_path_factory, request):
    # vocab 500: the head's last panel is partly padding; tied: the packed table serves lookups.
    return make_tiny_model(tmp_path_factory.mktemp("cpu_matmul"), arch="qwen2", hidden_size=96, vocab_size=500,
                           intermediate_size=200, num_attention_heads=6, num_key_value_heads=2,
                           tie_word_embeddings=request.param)


def _generate(model_dir, matmul_backend, **kw):
    llm = LLM(model_dir, matmul_backend=matmul_backend, block_size=8, num_kv_blocks=160, max_num_seqs=4,
              max_num_batched_tokens=64, skip_tokenizer_init=True, **kw)
    # 230 tokens, chunked over several 64-token steps beside the others' decodes.
    prompts = [{"prompt_token_ids": random_prompt(n, 500, seed=n)} for n in (230, 5, 37)]
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=3)
    return llm, llm.generate(prompts, params, use_tqdm=False)


def test_engine_cpu_matmul_matches_xla(model_dir):
    """Greedy tokens identical and top logprobs within 1e-5 (qkv biases, GQA, odd widths)."""
    xla_llm, xla_out = _generate(model_dir, "xla")
    cpu_llm, cpu_out = _generate(model_dir, "cpu")
    auto_llm, _ = _generate(model_dir, "auto", max_model_len=256)
    assert (xla_llm.get_stats()["matmul_backend"], cpu_llm.get_stats()["matmul_backend"],
            auto_llm.get_stats()["matmul_backend"]) == ("xla", "cpu", "cpu")
    for a, b in zip(xla_out, cpu_out):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for la, lb in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            assert set(la) == set(lb)
            for tok in la:
                assert abs(la[tok].logprob - lb[tok].logprob) < 1e-5
    # The engine's model holds the packed projections (once); the dense reference forward and a
    # checkpoint still see plain weights.
    model = cpu_llm.engine.model
    head = "embed" if model.config.tie_word_embeddings else "lm_head"
    assert isinstance(model.params["layers"][0]["q_proj"], packed.PackedWeight)
    assert isinstance(model.params[head], packed.PackedWeight)
    prompt = random_prompt(21, 500, seed=4)
    np.testing.assert_allclose(np.asarray(model.forward(prompt)), np.asarray(xla_llm.engine.model.forward(prompt)),
                               atol=1e-5, rtol=1e-5)


def test_checkpoint_of_a_packed_model_is_plain(model_dir, tmp_path):
    from jaxllm.model import Model

    llm, _ = _generate(model_dir, "cpu")
    llm.engine.model.save(str(tmp_path / "ckpt"))
    restored = Model.restore(str(tmp_path / "ckpt"))
    plain = packed.unpack_params(llm.engine.model.params)
    assert jax.tree.structure(restored.params) == jax.tree.structure(plain)
    for a, b in zip(jax.tree.leaves(restored.params), jax.tree.leaves(plain)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert restored.params["embed"].shape == (500, 96)


def test_bad_matmul_backend_is_named():
    with pytest.raises(ValueError, match="'onednn'"):
        EngineConfig(model="m", matmul_backend="onednn")
    with pytest.raises(ValueError, match="matmul_backend='cpu' needs"):
        EngineConfig(model="m", matmul_backend="cpu", parallel=ParallelConfig(tensor_parallel_size=2))
    with pytest.raises(ValueError, match="matmul_backend='cpu' needs"):
        EngineConfig(model="m", matmul_backend="cpu", dtype="bfloat16")
