"""vLLM as a benchmark peer, in its own virtual environment and process.

The worker (jaxllm/bench/peers/vllm_worker.py, self-contained: it imports vllm, never jaxllm)
reads a JSON workload and writes a JSON result; see its docstring for the keys. The venv is
looked for at $JAXLLM_VLLM_PYTHON or ~/.cache/jaxllm/venvs/vllm/bin/python (experiments/peers/
setup_vllm.sh builds it); without it, or without the worker, the system is skipped and says so.
Offline workloads only (the worker submits everything at once and reports throughput).
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile

from jaxllm.bench.metrics import request_row, request_table
from jaxllm.bench.systems import SystemResult, SystemUnavailable, require_offline

DEFAULT_PYTHON = "~/.cache/jaxllm/venvs/vllm/bin/python"
WORKER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "peers", "vllm_worker.py")


def vllm_python() -> str | None:
    path = os.path.expanduser(os.environ.get("JAXLLM_VLLM_PYTHON", DEFAULT_PYTHON))
    return path if os.path.exists(path) else None


def run_vllm(model_dir: str, workload, arrivals, cfg, timeout: float = 3600.0) -> SystemResult:
    require_offline("vllm", cfg.workload)
    python = vllm_python()
    if python is None:
        raise SystemUnavailable(f"no vLLM venv at {os.path.expanduser(DEFAULT_PYTHON)} "
                                f"(or $JAXLLM_VLLM_PYTHON): vLLM skipped")
    if not os.path.exists(WORKER):
        raise SystemUnavailable(f"the vLLM worker script {WORKER} is missing: vLLM skipped")
    e = cfg.engine
    job = {"model": model_dir, "prompts": workload.prompts, "output_lens": workload.output_lens,
           "max_num_seqs": e.max_num_seqs, "max_num_batched_tokens": e.max_num_batched_tokens,
           "max_model_len": e.max_model_len or workload.max_model_len, "dtype": e.dtype,
           "block_size": e.block_size,
           "kv_cache_gib": (e.kv_cache_memory_bytes or (1 << 30)) / (1 << 30)}
    ncpu = os.cpu_count() or 1
    env = dict(os.environ, VLLM_CPU_OMP_THREADS_BIND=os.environ.get("VLLM_CPU_OMP_THREADS_BIND", f"0-{ncpu - 1}"),
               VLLM_CPU_NUM_OF_RESERVED_CPU=os.environ.get("VLLM_CPU_NUM_OF_RESERVED_CPU", "0"))
    env.pop("PYTHONPATH", None)  # the worker runs on vLLM's interpreter, not ours
    with tempfile.TemporaryDirectory() as tmp:
        wpath, rpath = os.path.join(tmp, "workload.json"), os.path.join(tmp, "result.json")
        with open(wpath, "w") as f:
            json.dump(job, f)
        proc = subprocess.run([python, WORKER, wpath, rpath], env=env, capture_output=True, text=True,
                              timeout=timeout)
        if proc.returncode != 0 or not os.path.exists(rpath):
            raise RuntimeError(f"vLLM worker failed (rc {proc.returncode}): {proc.stderr[-2000:]}")
        with open(rpath) as f:
            res = json.load(f)
    elapsed = float(res["elapsed_s"])
    token_ids = res.get("token_ids") or [None] * workload.num_requests
    rows = []
    for spec, toks in zip(workload.requests, token_ids):
        row = request_row(spec.request_id, spec.prompt_len, spec.output_len, None,
                          num_output_tokens=spec.output_len if toks is None else len(toks), arrival_time=0.0)
        row.update(finished_time=elapsed, e2el=elapsed)  # the worker reports no per-request times
        rows.append(row)
    info = {k: v for k, v in res.items() if k != "token_ids"}  # the tokens stay out of the summary
    return SystemResult("vllm", request_table(rows), None, elapsed, info)
