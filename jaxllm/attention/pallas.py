"""Adapter from jaxllm's attention call to pallas_kernels.ragged_paged_attention.

`ragged_paged_attention` takes exactly the arguments of jaxllm.attention.reference's function, so
the engine swaps backends by swapping the function. The kernel variant is chosen per lowering
platform with lax.platform_dependent (not jax.default_backend(), which would be wrong when a step
is exported for another platform):

  tpu    -> Mosaic TPU kernel
  cuda   -> Mosaic GPU kernel when it supports the shapes/dtypes (16-bit, head_dim % 64 == 0,
            block_size % 8 == 0), else the jnp reference (e.g. an f32 cache: WGMMA has no f32)
  other  -> the TPU kernel in interpret mode. CPU runs are for correctness only; the TPU
            interpreter is the mature one (DMAs, semaphores, f32 and bf16, every kernel feature),
            whereas the Mosaic GPU interpreter cannot yet run WGMMA with transposed or register
            operands, so interpreting the GPU kernel replaces its matmuls by plain dots.

`batch_invariant_ragged_paged_attention` is the same with the kernels' aligned tiles
(EngineConfig.batch_invariant).

The KV write stays the jnp scatter of the reference (see pallas_kernels README: it is in place
when the cache is donated, and moves only T * nKV * D elements).
"""

from __future__ import annotations

import functools

from jax import lax

from jaxllm.attention import invariant, reference
from pallas_kernels.ragged_paged_attention import gpu as _gpu
from pallas_kernels.ragged_paged_attention import tpu as _tpu

write_kv = reference.write_kv


def _gpu_supported(q, k_cache):
    import jax.numpy as jnp

    D = q.shape[-1]
    return (q.dtype in (jnp.bfloat16, jnp.float16) and k_cache.dtype == q.dtype and D % 64 == 0
            and k_cache.shape[1] % 8 == 0)


def ragged_paged_attention(q, k_cache, v_cache, kv_lens, block_tables, cu_q_lens, *, sm_scale,
                           sliding_window=None, soft_cap=None, batch_invariant=False):
    """Same contract and shapes as jaxllm.attention.reference.ragged_paged_attention.

    q: [T, nH, D]; k_cache, v_cache: [num_blocks, block_size, nKV, D]; kv_lens: [S] int32;
    block_tables: [S, max_blocks] int32; cu_q_lens: [S+1] int32 -> [T, nH, D] (q.dtype).
    batch_invariant: the kernels' aligned-tile variant (EngineConfig.batch_invariant); where the
    GPU kernel cannot run, jaxllm.attention.invariant instead of the reference.
    """
    kw = dict(sm_scale=float(sm_scale), sliding_window=sliding_window, soft_cap=soft_cap)
    kernel_kw = dict(kw, batch_invariant=batch_invariant)
    tpu = functools.partial(_tpu.ragged_paged_attention, **kernel_kw)
    interpret = functools.partial(_tpu.ragged_paged_attention, interpret=True, **kernel_kw)
    if _gpu_supported(q, k_cache):
        cuda = functools.partial(_gpu.ragged_paged_attention, **kernel_kw)
    else:
        cuda = functools.partial((invariant if batch_invariant else reference).ragged_paged_attention, **kw)
    return lax.platform_dependent(q, k_cache, v_cache, kv_lens, block_tables, cu_q_lens,
                                  tpu=tpu, cuda=cuda, default=interpret)


batch_invariant_ragged_paged_attention = functools.partial(ragged_paged_attention, batch_invariant=True)
