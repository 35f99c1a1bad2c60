"""Small-M fp32 GEMM times: vLLM's prepacked oneDNN linear against plain torch (run under vLLM's venv).

    ~/.cache/jaxllm/venvs/vllm/bin/python experiments/peers/gemm_small_m.py   # after peers/setup_vllm.sh
    python experiments/peers/gemm_small_m.py --xla                           # the same shapes on XLA:CPU

Why: vLLM 0.32's CPU linear layers (vllm/model_executor/layers/utils.py,
dispatch_cpu_unquantized_gemm) prepack each weight once into a oneDNN handle
(ops.create_onednn_mm(W.t(), 32)); jaxllm's decode step spends most of its time in XLA:CPU's
small-M dots and the LM head. Shapes are SmolLM2-135M's (hidden 576, MLP 1536, vocabulary
49152) at M = 8, 32 and 128 rows; two threads, median of 30 calls, the max error against float64.
Compare the two runs' ratios measured in the same minute (timings on this machine are noisy).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

SHAPES = [(M, K, N) for M in (8, 32, 128) for K, N in ((576, 1536), (1536, 576), (576, 49152))]


def median_ms(fn, reps: int = 30) -> float:
    for _ in range(3):
        fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts)) * 1e3


def run_torch() -> None:
    import torch
    from vllm import _custom_ops as ops  # noqa: PLC0415 - only inside vLLM's venv

    torch.set_num_threads(2)
    for M, K, N in SHAPES:
        w, x = torch.randn(N, K), torch.randn(M, K)
        handle = ops.create_onednn_mm(w.t(), 32)
        t_onednn = median_ms(lambda: ops.onednn_mm(handle, x, None))
        t_torch = median_ms(lambda: x @ w.t())
        err = (ops.onednn_mm(handle, x, None).double() - x.double() @ w.double().t()).abs().max().item()
        print(f"M={M:3d} {K}x{N}: onednn_mm {t_onednn:7.3f} ms (err {err:.1e})  torch {t_torch:7.3f} ms", flush=True)


def run_xla() -> None:
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    matmul = jax.jit(lambda a, w: a @ w)
    for M, K, N in SHAPES:
        a = jnp.asarray(rng.standard_normal((M, K), np.float32))
        w = jnp.asarray(rng.standard_normal((K, N), np.float32))
        t = median_ms(lambda: matmul(a, w).block_until_ready())
        print(f"M={M:3d} {K}x{N}: xla {t:7.3f} ms", flush=True)


if __name__ == "__main__":  # vLLM spawns processes: keep the work under the guard
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--xla", action="store_true", help="time XLA:CPU (jaxllm's environment) instead")
    run_xla() if p.parse_args().xla else run_torch()
