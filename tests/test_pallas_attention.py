"""Ragged paged attention kernels (interpret mode on CPU) against the float64 dense reference.

Interpret mode is slow (seconds per distinct shape on 2 cores), so instead of the full cross
product each case below covers several axes at once; together they cover block sizes 8/16/32,
GQA groups 1/2/4/8, head_dim 64/128, kv lengths 1, block-1, block, block+1 and several blocks,
pure decode / pure prefill / mixed batches / chunked-prefill continuations, q_len-0 sequences,
token and sequence padding, permuted block tables, NaN in every unused slot and block, sliding
window, soft cap, fp32 and bf16.

Tolerances: fp32 atol=rtol=2e-5 (f32 accumulation vs float64). bf16 atol=rtol=2e-2 against the
float64 result on the same bf16-rounded inputs: the kernels round P to bf16 before P @ V and round
the output to bf16 (8 mantissa bits, ~4e-3 relative each).
"""

import jax.numpy as jnp
import numpy as np
import pytest

import functools

from attention_cases import make_case, outputs_across_company_and_chunking
from jaxllm.attention.reference import dense_reference, ragged_paged_attention as reference_rpa
from pallas_kernels.ragged_paged_attention import common
from pallas_kernels.ragged_paged_attention import gpu as gpu_kernel
from pallas_kernels.ragged_paged_attention import tpu as tpu_kernel


def _lengths(bs):
    return [1, bs - 1, bs, bs + 1, 3 * bs + 2]


def _expected(case, **kw):
    args = [np.asarray(a, np.float32) if a.dtype == jnp.bfloat16 else a for a in case.args()]
    return dense_reference(*args, sm_scale=case.sm_scale, **kw)


def _check(fn, case, dtype, **kw):
    out = fn(*map(jnp.asarray, case.args()), sm_scale=case.sm_scale, **kw)
    assert out.shape == case.q.shape and out.dtype == case.q.dtype
    out = np.asarray(out, np.float32)
    assert np.all(np.isfinite(out)), "NaN from an unused block leaked"
    T_real = int(case.cu_q_lens[-1])
    np.testing.assert_array_equal(out[T_real:], 0.0)
    tol = 2e-5 if dtype == np.float32 else 2e-2
    ref_kw = {k: v for k, v in kw.items() if k in ("sliding_window", "soft_cap")}
    np.testing.assert_allclose(out, _expected(case, **ref_kw), atol=tol, rtol=tol)


# (id, seqs builder(bs), make_case kwargs, kernel kwargs)
TPU_CASES = [
    ("decode-bs8-g1-d64", lambda bs: [(1, n) for n in _lengths(bs)],
     dict(block_size=8, group=1, num_kv_heads=2, head_dim=64), {}),
    ("prefill-bs16-g2-d128", lambda bs: [(n, n) for n in _lengths(bs)],
     dict(block_size=16, group=2, num_kv_heads=2, head_dim=128), {}),
    ("mixed-bs32-g4-d64", lambda bs: [(20, 3 * bs + 5), (1, bs - 1), (0, 0), (1, bs), (1, bs + 1),
                                      (bs // 2, bs + 3), (1, 1)],
     dict(block_size=32, group=4, num_kv_heads=2, head_dim=64, pad_tokens=5, pad_seqs=2), {}),
    # Tiny tiles and steps: many tiles per sequence, sequences straddling tiles, multi-step DMA
    # pipelines and cross-sequence prefetches.
    ("mixed-small-tiles-bs8-g2", lambda bs: [(13, 30), (1, 9), (1, 17), (6, 6), (1, 2)],
     dict(block_size=8, group=2, num_kv_heads=2, head_dim=64),
     dict(num_queries_per_block=4, num_kv_blocks_per_step=1)),
]


@pytest.mark.parametrize("name,seqs,case_kw,kernel_kw", TPU_CASES, ids=[c[0] for c in TPU_CASES])
def test_tpu_kernel_fp32(name, seqs, case_kw, kernel_kw):
    case = make_case(seqs(case_kw["block_size"]), seed=len(name), **case_kw)
    _check(tpu_kernel.ragged_paged_attention, case, np.float32, interpret=True, **kernel_kw)


def test_tpu_kernel_bf16_gqa8_d128():
    bs = 16
    seqs = [(1, n) for n in _lengths(bs)] + [(9, 40)]
    case = make_case(seqs, block_size=bs, group=8, num_kv_heads=1, head_dim=128, dtype=jnp.bfloat16)
    _check(tpu_kernel.ragged_paged_attention, case, jnp.bfloat16, interpret=True)


def test_tpu_kernel_bf16_packed_heads():
    # nKV=4 bf16 exercises the u32-packed strided head loads (even and odd heads).
    case = make_case([(7, 25), (1, 8), (1, 9)], block_size=8, group=2, num_kv_heads=4,
                     head_dim=64, dtype=jnp.bfloat16)
    _check(tpu_kernel.ragged_paged_attention, case, jnp.bfloat16, interpret=True,
           num_kv_blocks_per_step=2)


@pytest.mark.parametrize("window,soft_cap", [(5, None), (None, 3.0), (16, 10.0)])
def test_tpu_kernel_window_softcap(window, soft_cap):
    case = make_case([(20, 50), (1, 37), (3, 3), (1, 9)], block_size=8, group=2, head_dim=64)
    case.q *= 3.0
    _check(tpu_kernel.ragged_paged_attention, case, np.float32, interpret=True,
           sliding_window=window, soft_cap=soft_cap, num_kv_blocks_per_step=2)


def test_tpu_kernel_all_padding():
    case = make_case([], block_size=8, pad_tokens=8, pad_seqs=3)
    _check(tpu_kernel.ragged_paged_attention, case, np.float32, interpret=True)


# The Mosaic GPU interpreter runs TMA copies, barriers, masks and the online softmax of the GPU
# kernel, but not its WGMMAs (replaced by plain dots when interpreting: see gpu.py). bf16 only.
GPU_CASES = [
    ("mixed-bs16-g2-d64", lambda bs: [(10, 2 * bs + 3), (1, bs - 1), (1, bs), (1, bs + 1), (1, 1)],
     dict(block_size=16, group=2, num_kv_heads=2, head_dim=64), {}),
    ("decode-bs8-g8-d128-window-cap", lambda bs: [(1, n) for n in _lengths(bs)] + [(5, 20)],
     dict(block_size=8, group=8, num_kv_heads=1, head_dim=128),
     dict(sliding_window=9, soft_cap=20.0)),
]


@pytest.mark.parametrize("name,seqs,case_kw,kernel_kw", GPU_CASES, ids=[c[0] for c in GPU_CASES])
def test_gpu_kernel_interpret_bf16(name, seqs, case_kw, kernel_kw):
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

    case = make_case(seqs(case_kw["block_size"]), seed=len(name), dtype=jnp.bfloat16, **case_kw)
    _check(gpu_kernel.ragged_paged_attention, case, jnp.bfloat16, interpret=InterpretGPUParams(),
           **kernel_kw)


# batch_invariant=True: tiles aligned to absolute positions (common.query_layout), gaps between
# sequences' rows, tiles left empty at the end of the grid.
def test_tpu_kernel_batch_invariant_matches_reference():
    case = make_case([(20, 50), (1, 37), (0, 0), (3, 3), (1, 9), (13, 30)], block_size=8, group=2,
                     head_dim=64, pad_tokens=5, pad_seqs=2)
    _check(tpu_kernel.ragged_paged_attention, case, np.float32, interpret=True, batch_invariant=True,
           sliding_window=5, soft_cap=3.0, num_queries_per_block=4, num_kv_blocks_per_step=1)


def test_tpu_kernel_batch_invariant_row_independent_of_company_and_chunking():
    """A token decoded alone, with company, or at the end of a 9- or 30-token prefill chunk:
    bitwise the same output (same shapes except alone, so interpret mode compiles twice). With
    these shapes the default (packed) layout differs by 1.2e-7 between the runs (jax 0.10.2,
    interpret mode on XLA:CPU)."""
    fn = functools.partial(tpu_kernel.ragged_paged_attention, interpret=True, batch_invariant=True,
                           num_kv_blocks_per_step=2)
    outs = outputs_across_company_and_chunking(fn, pad_to=(48, 4, 40, 26), sliding_window=20, soft_cap=5.0,
                                               case_kw=dict(head_dim=32, group=4, num_kv_heads=1))
    for o in outs[1:]:
        np.testing.assert_array_equal(o, outs[0])


def test_gpu_kernel_batch_invariant_interpret_bf16():
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

    case = make_case([(10, 35), (1, 15), (1, 16), (0, 0), (1, 1)], block_size=16, group=2,
                     num_kv_heads=2, head_dim=64, dtype=jnp.bfloat16)
    _check(gpu_kernel.ragged_paged_attention, case, jnp.bfloat16, interpret=InterpretGPUParams(),
           batch_invariant=True)


def test_adapter_on_cpu_matches_reference():
    from jaxllm.attention import pallas as adapter

    case = make_case([(6, 20), (1, 9)], block_size=8, group=2, head_dim=64)
    args = list(map(jnp.asarray, case.args()))
    out = adapter.ragged_paged_attention(*args, sm_scale=case.sm_scale)
    ref = reference_rpa(*args, sm_scale=case.sm_scale)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("mutate,match", [
    (lambda a: a.update(q=a["q"][..., :32]), "head_dim"),
    (lambda a: a.update(kv_lens=a["kv_lens"][:-1]), "kv_lens.shape"),
    (lambda a: a.update(cu_q_lens=a["cu_q_lens"].astype(np.int64)), "int32"),
    (lambda a: a.update(q=a["q"][:, :3]), "multiple of num_kv_heads"),
    (lambda a: a.update(v_cache=a["v_cache"][:-1]), "v_cache.shape"),
])
def test_validation_names_offending_values(mutate, match):
    case = make_case([(2, 5)], block_size=8, group=2, head_dim=64)
    a = dict(q=case.q, k_cache=case.k_cache, v_cache=case.v_cache, kv_lens=case.kv_lens,
             block_tables=case.block_tables, cu_q_lens=case.cu_q_lens)
    mutate(a)
    with pytest.raises(ValueError, match=match):
        common.validate_inputs(*a.values(), sm_scale=0.1)
    if match != "int32":  # at the jit boundary int64 numpy arrays become int32 (x64 off)
        with pytest.raises(ValueError, match=match):
            tpu_kernel.ragged_paged_attention(*a.values(), sm_scale=0.1, interpret=True)
