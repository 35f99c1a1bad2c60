"""Serving benchmark: jaxllm serve against transformers serve (continuous batching) on the same
weights, the same Poisson-arrival client (jaxllm/entrypoints/openai/bench_serve.py) for both.

    python experiments/bench_serve.py                                  # SmolLM2-135M-Instruct, both servers
    python experiments/bench_serve.py --systems jaxllm --num-prompts 64 --request-rate 4
    python experiments/bench_serve.py --base-url http://127.0.0.1:8000  # only the client, against a running server

Each system's server starts as a subprocess on a free port of 127.0.0.1, gets one untimed
warm-up round of the same workload (jaxllm compiles its token buckets there), then the timed
run; the server is stopped before the next. The model alias smollm2-135m-instruct is a GGUF;
transformers serve cannot read a local GGUF file (only `<hub repo>:<file>.gguf`), so both load an
fp32 HF directory made once from that GGUF (dequantised by transformers' GGUF loader, cached
under ~/.cache/jaxllm/bench_models/). Results append to experiments/results/bench_serve_cpu.jsonl.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

import httpx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from jaxllm.entrypoints.openai import bench_serve  # noqa: E402

SMOLLM2_HF = os.path.expanduser("~/.cache/jaxllm/bench_models/smollm2-135m-instruct-hf")


def smollm2_hf_dir() -> str:
    """An fp32 HF directory of the smollm2-135m-instruct alias's GGUF weights (made once)."""
    if os.path.exists(os.path.join(SMOLLM2_HF, "model.safetensors")):
        return SMOLLM2_HF
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from jaxllm.models.aliases import resolve_model_path

    path = resolve_model_path("smollm2-135m-instruct")
    folder, name = os.path.dirname(path), os.path.basename(path)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # a GGUF-loaded model refuses save_pretrained; copy its weights
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    model.save_pretrained(SMOLLM2_HF)
    tokenizer.save_pretrained(SMOLLM2_HF)
    return SMOLLM2_HF


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(system: str, model: str, port: int, args) -> list[str]:
    if system == "jaxllm":
        return [sys.executable, "-m", "jaxllm.serve", model, "--port", str(port), "--served-model-name", "bench",
                "--max-num-seqs", str(args.max_num_seqs), "--max-num-batched-tokens", str(args.max_num_batched_tokens),
                "--token-buckets", *map(str, args.token_buckets), "--max-model-len", str(args.max_model_len),
                "--skip-warmup", "--uvicorn-log-level", "warning"]
    if system == "transformers":
        return ["transformers", "serve", "--continuous-batching", "--device", "cpu", "--dtype", "float32",
                "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning", model]
    raise ValueError(f"unknown system {system!r}")


def wait_ready(proc, url: str, log_path: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited ({proc.returncode}); log: {open(log_path).read()[-2000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(1)
    raise RuntimeError(f"server not ready after {timeout} s; log: {open(log_path).read()[-2000:]}")


def compilations(url: str) -> float | None:
    """jaxllm's step-compilation counter from /metrics (None for other servers)."""
    try:
        text = httpx.get(f"{url}/metrics", timeout=10).text
    except httpx.HTTPError:
        return None
    for line in text.splitlines():
        if line.startswith("jaxllm:num_compilations_total"):
            return float(line.rsplit(" ", 1)[1])
    return None


def bench_system(system: str, model: str, args) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = os.path.join(tempfile.gettempdir(), f"bench_serve_{system}_{port}.log")
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu"),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    started = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(server_command(system, model, port, args), stdout=log, stderr=subprocess.STDOUT,
                                env=env, cwd=ROOT)
    try:
        wait_ready(proc, url, log_path, args.startup_timeout)
        client_args = copy.copy(args)
        client_args.base_url, client_args.model, client_args.label = url, None, system
        warm = copy.copy(client_args)
        warm.request_rate, warm.output_len = float("inf"), 4  # every prefill/decode bucket, untimed
        warm_summary = asyncio.run(bench_serve.run(warm))
        ready_s = time.monotonic() - started
        before = compilations(url)
        summary = asyncio.run(bench_serve.run(client_args))
        after = compilations(url)
        summary["server_ready_and_warm_s"] = ready_s
        summary["warmup_failed"] = warm_summary["failed"]
        summary["compilations_during_run"] = None if before is None else after - before
        return summary
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    bench_serve.add_arguments(parser)
    parser.set_defaults(endpoint="chat", num_prompts=16, request_rate=1.0, input_len=16, output_len=16,
                        ignore_eos=False, out=os.path.join(ROOT, "experiments", "results", "bench_serve_cpu.jsonl"))
    parser.add_argument("--server-model", default="smollm2-135m-instruct",
                        help="what both servers load: an HF directory, or the alias (converted once)")
    parser.add_argument("--systems", nargs="+", default=["jaxllm", "transformers"])
    parser.add_argument("--max-num-seqs", type=int, default=16)
    parser.add_argument("--max-num-batched-tokens", type=int, default=128)
    parser.add_argument("--token-buckets", type=int, nargs="+", default=[16, 128])
    parser.add_argument("--max-model-len", type=int, default=512)
    parser.add_argument("--startup-timeout", type=float, default=900)
    args = parser.parse_args()
    if "--base-url" in sys.argv:  # only the client, against a server someone else started
        return bench_serve.main(args)
    model = smollm2_hf_dir() if args.server_model == "smollm2-135m-instruct" else args.server_model
    results = []
    for system in args.systems:
        try:
            summary = bench_system(system, model, args)
        except Exception as e:  # noqa: BLE001 - report a system that did not run, keep the others
            print(f"{system}: did not run: {e}", file=sys.stderr)
            continue
        summary["server_model"] = model
        results.append(summary)
        print(bench_serve.format_summary(summary), flush=True)
        with open(args.out, "a") as f:
            f.write(json.dumps(summary) + "\n")
    if len(results) == 2:
        a, b = results
        print(f"\n{a['label']} / {b['label']}: output tok/s x{a['output_token_throughput'] / b['output_token_throughput']:.2f}, "
              f"median TTFT x{a['ttft_ms']['median'] / b['ttft_ms']['median']:.2f}, "
              f"median ITL x{(a['itl_ms']['median'] or 0) / (b['itl_ms']['median'] or 1):.2f}")
    return 0 if len(results) == len(args.systems) else 1


if __name__ == "__main__":
    sys.exit(main())
