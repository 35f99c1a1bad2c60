"""Ragged paged attention on the CPU: a C++ kernel through the XLA FFI for every token of a step
(decodes and prefill chunks alike).

Same contract and arguments as jaxllm.attention.reference.ragged_paged_attention. The reference
serves decode tokens by gathering KV chunks out of the paged cache (3-7 GB/s on XLA:CPU) and spends
dozens of small ops per layer on bookkeeping; paged_attention.cc reads each key and value where it
lies, shares each K/V row between a tile's queries, and does its bookkeeping in the call. Used by
`attention_backend="cpu"`, and by the default "auto" on a CPU backend when the kernel builds.

The kernel is compiled on first use with the system's C++ compiler (`$CXX`, else c++ / g++) into
~/.cache/jaxllm/cpu_kernels/<hash>/ (`JAXLLM_CPU_KERNEL_DIR` moves it), keyed by the source, the
compiler, the flags, jaxlib's version and this CPU's feature flags (it is built with
-march=native), under a file lock and renamed into place, so processes may share the directory.
Without a compiler `available()` is False and says why (`unavailable_reason()`); "auto" then
falls back to the reference.

On other platforms (an exported step, an accelerator) the function lowers to the reference:
the custom call exists for the CPU only. f32 caches only (bf16 goes to the reference).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxllm.attention import reference

write_kv = reference.write_kv

_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "paged_attention.cc")
_TARGET = "jaxllm_ragged_paged_attention_f32"
_SYMBOL = "JaxllmRaggedPagedAttentionF32"
_FLAGS = ["-O3", "-march=native", "-fopenmp-simd", "-std=c++17", "-shared", "-fPIC", "-w"]
# The kernel's fixed per-thread scratch (paged_attention.cc kMax*): larger shapes use the reference.
_MAX_GROUP, _MAX_HEAD_DIM, _MAX_BLOCK = 16, 256, 64

_state: dict = {}  # "ok": bool, "reason": str, "path": str


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        return platform.processor()


def _cache_dir() -> str:
    base = os.environ.get("JAXLLM_CPU_KERNEL_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "jaxllm", "cpu_kernels")
    return base


def _build(cxx: str) -> str:
    """Compile paged_attention.cc (once per key) and return the shared library's path."""
    import jaxlib
    from filelock import FileLock

    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=False).stdout
    with open(_SOURCE, "rb") as f:
        source = f.read()
    key = hashlib.sha256(b"\0".join([source, version.encode(), " ".join(_FLAGS).encode(),
                                     jaxlib.__version__.encode(), _cpu_flags().encode()])).hexdigest()[:16]
    out_dir = os.path.join(_cache_dir(), key)
    lib = os.path.join(out_dir, "libjaxllm_cpu_attention.so")
    if os.path.exists(lib):
        return lib
    os.makedirs(out_dir, exist_ok=True)
    with FileLock(os.path.join(out_dir, ".lock")):
        if os.path.exists(lib):  # another process built it while we waited
            return lib
        fd, tmp = tempfile.mkstemp(dir=out_dir, suffix=".so.tmp")
        os.close(fd)
        cmd = [cxx, *_FLAGS, "-I", jax.ffi.include_dir(), _SOURCE, "-o", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            os.unlink(tmp)
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
        os.replace(tmp, lib)
    return lib


def available() -> bool:
    """Build (or find) and register the kernel once per process; False if that is impossible."""
    if "ok" not in _state:
        cxx = _compiler()
        if cxx is None:
            _state.update(ok=False, reason="no C++ compiler found ($CXX, c++, g++, clang++)")
        else:
            try:
                path = _build(cxx)
                lib = ctypes.cdll.LoadLibrary(path)
                jax.ffi.register_ffi_target(_TARGET, jax.ffi.pycapsule(getattr(lib, _SYMBOL)), platform="cpu")
                _state.update(ok=True, reason="", path=path)
            except (OSError, RuntimeError, subprocess.SubprocessError) as e:
                _state.update(ok=False, reason=f"building the CPU attention kernel failed: {e}")
    return _state["ok"]


def unavailable_reason() -> str:
    available()
    return _state["reason"]


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
