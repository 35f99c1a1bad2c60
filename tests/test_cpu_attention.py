"""jaxllm.attention.cpu (the C++ ragged kernel through the XLA FFI) against the float64 numpy
computation and the jnp reference, on the adversarial cases of attention_cases (permuted block
tables, NaN in block 0, past every kv_len and in unused blocks)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention_cases import make_case
from jaxllm.attention import cpu, reference

pytestmark = pytest.mark.skipif(not cpu.available(), reason=f"CPU kernel unavailable: {cpu.unavailable_reason()}")

BS = 8


def _check(case, **kw):
    args = tuple(map(jnp.asarray, case.args()))
    out = np.asarray(jax.jit(lambda *a: cpu.ragged_paged_attention(*a, sm_scale=case.sm_scale, **kw))(*args))
    dense = reference.dense_reference(*case.args(), sm_scale=case.sm_scale, **kw)
    assert np.all(np.isfinite(out)), "NaN/inf leaked from unused blocks"
    np.testing.assert_array_equal(out[int(case.cu_q_lens[-1]):], 0.0)  # padding tokens -> zeros
    np.testing.assert_allclose(out, dense, atol=2e-5, rtol=2e-5)
    ref = np.asarray(reference.ragged_paged_attention(*args, sm_scale=case.sm_scale, **kw))
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)
    return out


@pytest.mark.parametrize("kv_len", [1, BS - 1, BS, BS + 1, 3 * BS + 5, 200])
def test_decode_lengths(kv_len):
    _check(make_case([(1, kv_len)] * 3 + [(1, 2)], block_size=BS, seed=kv_len))


@pytest.mark.parametrize("group", [1, 3, 8])
def test_mixed_batch_prefill_shared_decode_by_kernel(group):
    # Chunks, short and long, and decodes in one kernel call.
    seqs = [(40, 90), (1, 33), (3, 17), (7, 7), (1, 1), (12, 12)]
    _check(make_case(seqs, block_size=BS, group=group, head_dim=32, seed=group))


@pytest.mark.parametrize("window", [None, 7])
def test_long_chunks_beside_decodes(window):
    # Chunks of several 16-token tiles (the last one partial), after cached context and not.
    n = 64
    _check(make_case([(n + 1, n + 1), (1, 70), (n, n + 30), (2 * n + 3, 3 * n), (1, 2)], block_size=BS, seed=5),
           sliding_window=window)


@pytest.mark.parametrize("window", [1, 5, 3 * BS])
def test_sliding_window(window):
    _check(make_case([(30, 50), (1, 40), (5, 5), (1, 2)], block_size=BS, seed=window), sliding_window=window)


def test_soft_cap():
    case = make_case([(12, 30), (1, 20), (2, 9)], block_size=BS)
    case.q *= 4.0  # make the cap bite
    _check(case, soft_cap=5.0)


def test_larger_block_and_head_dim_and_all_padding():
    _check(make_case([(1, 64), (1, 65), (2, 100)], block_size=32, head_dim=128, seed=3))
    _check(make_case([], block_size=BS, pad_tokens=4))


def test_unsupported_dtype_falls_back_to_reference():
    case = make_case([(1, 20), (1, 3)], block_size=BS, dtype=jnp.bfloat16)
    args = tuple(map(jnp.asarray, case.args()))
    assert not cpu.supported(args[0], args[1])
    out = cpu.ragged_paged_attention(*args, sm_scale=case.sm_scale)
    ref = reference.ragged_paged_attention(*args, sm_scale=case.sm_scale)
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(ref, np.float32))


def test_lowering_for_another_platform_has_no_custom_call():
    # The custom call exists for the CPU only: a step exported for TPU lowers to the reference.
    case = make_case([(1, 20)], block_size=BS)
    args = tuple(map(jnp.asarray, case.args()))
    fn = jax.jit(lambda *a: cpu.ragged_paged_attention(*a, sm_scale=case.sm_scale))
    cpu_text = fn.trace(*args).lower(lowering_platforms=("cpu",)).as_text()
    tpu_text = fn.trace(*args).lower(lowering_platforms=("tpu",)).as_text()
    assert cpu._TARGET in cpu_text and cpu._TARGET not in tpu_text
