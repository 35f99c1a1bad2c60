"""C++ kernels for the CPU, built on first use and registered as XLA FFI targets.

A kernel is one .cc file beside its Python module (jaxllm/attention/cpu/paged_attention.cc,
jaxllm/models/matmul.cc). It is compiled on first use with the system's C++ compiler (`$CXX`,
else c++ / g++ / clang++) into ~/.cache/jaxllm/cpu_kernels/<hash>/ (`JAXLLM_CPU_KERNEL_DIR`
moves it), keyed by the source, the compiler, the flags, jaxlib's version and this CPU's feature
flags (kernels are built with -march=native), under a file lock and renamed into place, so
processes may share the directory. Without a compiler `available()` is False and says why
(`unavailable_reason()`); callers then fall back to their jnp reference.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile

import jax

BASE_FLAGS = ("-O3", "-march=native", "-fopenmp-simd", "-std=c++17", "-shared", "-fPIC", "-w")
# Headers the kernels share (parallel_for.h): on the include path, and part of every build key.
INCLUDE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpu_include")


def _headers() -> bytes:
    return b"".join(open(os.path.join(INCLUDE_DIR, name), "rb").read() for name in sorted(os.listdir(INCLUDE_DIR)))


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
    return os.environ.get("JAXLLM_CPU_KERNEL_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "jaxllm", "cpu_kernels")


class FfiKernel:
    """One .cc source exporting FFI handler `symbol`, registered as CPU custom-call `target`.

    `library` (after `available()`): the loaded ctypes library, for plain C queries the kernel
    exports beside its handler (e.g. a layout constant)."""

    def __init__(self, source: str, target: str, symbol: str, extra_flags: tuple[str, ...] = ()):
        self.source, self.target, self.symbol = source, target, symbol
        self.flags = (*BASE_FLAGS, *extra_flags)
        self.library = None
        self._ok: bool | None = None
        self._reason = ""

    def _build(self, cxx: str) -> str:
        """Compile the source (once per key) and return the shared library's path."""
        import jaxlib
        from filelock import FileLock

        version = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=False).stdout
        with open(self.source, "rb") as f:
            source = f.read()
        key = hashlib.sha256(b"\0".join([source, _headers(), version.encode(), " ".join(self.flags).encode(),
                                         jaxlib.__version__.encode(), _cpu_flags().encode()])).hexdigest()[:16]
        out_dir = os.path.join(_cache_dir(), key)
        lib = os.path.join(out_dir, f"lib{os.path.splitext(os.path.basename(self.source))[0]}.so")
        if os.path.exists(lib):
            return lib
        os.makedirs(out_dir, exist_ok=True)
        with FileLock(os.path.join(out_dir, ".lock")):
            if os.path.exists(lib):  # another process built it while we waited
                return lib
            fd, tmp = tempfile.mkstemp(dir=out_dir, suffix=".so.tmp")
            os.close(fd)
            cmd = [cxx, *self.flags, "-I", INCLUDE_DIR, "-I", jax.ffi.include_dir(), self.source, "-o", tmp]
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                os.unlink(tmp)
                raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
            os.replace(tmp, lib)
        return lib

    def available(self) -> bool:
        """Build (or find) and register the kernel once per process; False if that is impossible."""
        if self._ok is None:
            cxx = _compiler()
            if cxx is None:
                self._ok, self._reason = False, "no C++ compiler found ($CXX, c++, g++, clang++)"
            else:
                try:
                    path = self._build(cxx)
                    self.library = ctypes.cdll.LoadLibrary(path)
                    jax.ffi.register_ffi_target(self.target, jax.ffi.pycapsule(getattr(self.library, self.symbol)),
                                                platform="cpu")
                    self._ok = True
                except (OSError, RuntimeError, subprocess.SubprocessError) as e:
                    self._ok, self._reason = False, f"building {os.path.basename(self.source)} failed: {e}"
        return self._ok

    def unavailable_reason(self) -> str:
        """Why `available()` is False ('' when it is True)."""
        self.available()
        return self._reason
