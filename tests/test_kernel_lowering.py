"""Every attention kernel cross-lowers on this CPU machine for TPU (Mosaic TPU) and CUDA (Mosaic
GPU), and the exported module really contains the Mosaic custom call (not an XLA fallback).

This proves the Pallas -> Mosaic lowering (block shapes, scalar prefetch, DMA / TMA descriptors,
register layouts for Mosaic GPU); the final Mosaic TPU compilation happens inside libtpu at compile
time on a TPU host and is not exercised here.
"""

import functools

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AbstractDevice, AbstractMesh

from jaxllm.attention import pallas as adapter
from pallas_kernels.ragged_paged_attention import gpu as gpu_kernel
from pallas_kernels.ragged_paged_attention import tpu as tpu_kernel

TPU_MESH = AbstractMesh((1,), ("x",), abstract_device=AbstractDevice(
    device_kind="TPU v5 lite", num_cores=1, platform="tpu"))


def _specs(T=64, nH=8, nKV=2, D=128, num_blocks=64, bs=16, S=8, max_blocks=16, dtype=jnp.bfloat16):
    s = jax.ShapeDtypeStruct
    return (s((T, nH, D), dtype), s((num_blocks, bs, nKV, D), dtype), s((num_blocks, bs, nKV, D), dtype),
            s((S,), jnp.int32), s((S, max_blocks), jnp.int32), s((S + 1,), jnp.int32))


def _export(fn, platform, specs):
    f = jax.jit(fn)
    if platform == "tpu":
        # Mosaic TPU lowering asks for the chip (scalar prefetch, SMEM layout): describe one.
        with jax.sharding.use_abstract_mesh(TPU_MESH):
            return jax.export.export(f, platforms=[platform])(*specs).mlir_module()
    return jax.export.export(f, platforms=[platform])(*specs).mlir_module()


KW = dict(sm_scale=0.125)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("extra", [{}, dict(sliding_window=64, soft_cap=30.0)])
@pytest.mark.parametrize("shape", [dict(), dict(nH=8, nKV=8, D=64, bs=32), dict(nH=16, nKV=1, bs=8)])
def test_tpu_kernel_lowers(dtype, extra, shape):
    txt = _export(functools.partial(tpu_kernel.ragged_paged_attention, **KW, **extra), "tpu",
                  _specs(dtype=dtype, **shape))
    assert "tpu_custom_call" in txt


@pytest.mark.parametrize("extra", [{}, dict(sliding_window=64, soft_cap=30.0)])
@pytest.mark.parametrize("shape", [dict(), dict(nH=8, nKV=8, D=64, bs=32), dict(nH=16, nKV=1, bs=8)])
def test_gpu_kernel_lowers(extra, shape):
    txt = _export(functools.partial(gpu_kernel.ragged_paged_attention, **KW, **extra), "cuda",
                  _specs(**shape))
    assert "mosaic_gpu" in txt


@pytest.mark.parametrize("platform,marker", [("tpu", "tpu_custom_call"), ("cuda", "mosaic_gpu")])
def test_batch_invariant_kernels_lower(platform, marker):
    # Aligned tiles: more grid programs than tokens / tile, gaps in the q row ranges.
    kernel = tpu_kernel if platform == "tpu" else gpu_kernel
    for extra in ({}, dict(sliding_window=64, soft_cap=30.0)):
        txt = _export(functools.partial(kernel.ragged_paged_attention, batch_invariant=True, **KW, **extra),
                      platform, _specs())
        assert marker in txt
    txt = _export(functools.partial(adapter.batch_invariant_ragged_paged_attention, **KW), platform, _specs())
    assert marker in txt


@pytest.mark.parametrize("platform,marker", [("tpu", "tpu_custom_call"), ("cuda", "mosaic_gpu")])
def test_adapter_picks_the_platform_kernel(platform, marker):
    txt = _export(functools.partial(adapter.ragged_paged_attention, **KW), platform, _specs())
    assert marker in txt


def test_adapter_f32_on_cuda_falls_back_to_reference():
    # WGMMA has no f32 operands: the adapter must not fail, and must not pretend to run a kernel.
    txt = _export(functools.partial(adapter.ragged_paged_attention, **KW), "cuda",
                  _specs(dtype=jnp.float32))
    assert "mosaic_gpu" not in txt
