"""Ragged paged attention on the CPU: a C++ kernel through the XLA FFI for every token of a step
(decodes and prefill chunks alike).

Same contract and arguments as jaxllm.attention.reference.ragged_paged_attention. The reference
serves decode tokens by gathering KV chunks out of the paged cache (3-7 GB/s on XLA:CPU) and spends
dozens of small ops per layer on bookkeeping; paged_attention.cc reads each key and value where it
lies, shares each K/V row between a tile's queries, and does its bookkeeping in the call. Used by
`attention_backend="cpu"`, and by the default "auto" on a CPU backend when the kernel builds.

The kernel is compiled on first use with the system's C++ compiler (jaxllm/ffi_build.py: cached
under ~/.cache/jaxllm/cpu_kernels, built with -march=native). Without a compiler `available()`
is False and says why (`unavailable_reason()`); "auto" then falls back to the reference.

On other platforms (an exported step, an accelerator) the function lowers to the reference:
the custom call exists for the CPU only. f32 caches only (bf16 goes to the reference).
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxllm.attention import reference
from jaxllm.ffi_build import FfiKernel

write_kv = reference.write_kv

# The kernel's fixed per-thread scratch (paged_attention.cc kMax*): larger shapes use the reference.
_MAX_GROUP, _MAX_HEAD_DIM, _MAX_BLOCK = 16, 256, 64
_TARGET = "jaxllm_ragged_paged_attention_f32"
_KERNEL = FfiKernel(os.path.join(os.path.dirname(os.path.abspath(__file__)), "paged_attention.cc"),
                    _TARGET, "JaxllmRaggedPagedAttentionF32")


def available() -> bool:
    """Build (or find) and register the kernel once per process; False if that is impossible."""
    return _KERNEL.available()


def unavailable_reason() -> str:
    return _KERNEL.unavailable_reason()


def supported(q, k_cache) -> bool:
    """Shapes and dtypes the kernel takes (static facts of a trace)."""
    nH, D = q.shape[1:]
    bs, nKV = k_cache.shape[1:3]
    return (q.dtype == jnp.float32 and k_cache.dtype == jnp.float32 and nH % nKV == 0
            and nH // nKV <= _MAX_GROUP and D <= _MAX_HEAD_DIM and bs <= _MAX_BLOCK)


def kernel_attention(q, k_cache, v_cache, kv_lens, block_tables, cu_q_lens, *, sm_scale,
                     sliding_window=None, soft_cap=None):
    """The kernel call, same arguments and result as ragged_paged_attention (f32 only): q
    [T, nH, D], caches [num_blocks, block_size, nKV, D], kv_lens [S], block_tables [S, max_blocks],
    cu_q_lens [S + 1] -> [T, nH, D] f32, zeros for padding tokens."""
    call = jax.ffi.ffi_call(_TARGET, jax.ShapeDtypeStruct(q.shape, jnp.float32))
    return call(q, k_cache, v_cache, kv_lens.astype(jnp.int32), block_tables.astype(jnp.int32),
                cu_q_lens.astype(jnp.int32), sm_scale=np.float32(sm_scale), soft_cap=np.float32(soft_cap or 0.0),
                window=np.int64(sliding_window or 0))


def ragged_paged_attention(q, k_cache, v_cache, kv_lens, block_tables, cu_q_lens, *, sm_scale,
                           sliding_window=None, soft_cap=None):
    """Same contract and shapes as jaxllm.attention.reference.ragged_paged_attention:
    q [T, nH, D]; caches [num_blocks, block_size, nKV, D]; kv_lens [S]; block_tables [S, max_blocks];
    cu_q_lens [S+1] -> [T, nH, D] (q.dtype)."""
    kw = dict(sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap)
    args = (q, k_cache, v_cache, kv_lens, block_tables, cu_q_lens)
    if not (supported(q, k_cache) and available()):
        return reference.ragged_paged_attention(*args, **kw)
    on_cpu = lambda *a: kernel_attention(*a, **kw).astype(q.dtype)  # noqa: E731
    return lax.platform_dependent(*args, cpu=on_cpu, default=functools.partial(reference.ragged_paged_attention, **kw))
