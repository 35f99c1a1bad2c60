"""`jaxllm serve MODEL [options]` (also `python -m jaxllm.serve`): a model behind the OpenAI API.

    jaxllm serve smollm2-135m-instruct --port 8000 --api-key secret

MODEL is anything LLM accepts: a local HF directory, a .gguf file, or an alias. Engine flags
carry vLLM's names. The server compiles every step variant before it listens (skip with
--skip-warmup), so no request waits for a compilation.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

from jaxllm.config import DTYPES

logger = logging.getLogger("jaxllm.server")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from jaxllm.core.policies import POLICIES

    parser.add_argument("model", help="HF model directory, .gguf file, or alias (e.g. smollm2-135m-instruct)")
    server = parser.add_argument_group("server")
    server.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    server.add_argument("--port", type=int, default=8000, help="(default: %(default)s)")
    server.add_argument("--api-key", default=os.environ.get("JAXLLM_API_KEY"),
                        help="require 'Authorization: Bearer KEY' on /v1 routes (default: $JAXLLM_API_KEY)")
    server.add_argument("--served-model-name", nargs="+", default=None,
                        help="model name(s) clients use; the first is reported (default: MODEL)")
    server.add_argument("--uvicorn-log-level", default="info",
                        choices=["critical", "error", "warning", "info", "debug", "trace"])
    server.add_argument("--skip-warmup", action="store_true",
                        help="listen at once; steps compile on first use (slow first requests)")
    engine = parser.add_argument_group("engine (vLLM's flag names)")
    engine.add_argument("--dtype", default="float32", choices=DTYPES + ("auto",), help="'auto' is float32")
    engine.add_argument("--seed", type=int, default=0, help="seeds requests that give no seed")
    engine.add_argument("--max-num-seqs", type=int, default=64)
    engine.add_argument("--max-num-batched-tokens", type=int, default=512)
    engine.add_argument("--max-model-len", type=int, default=None, help="default: the model's")
    engine.add_argument("--block-size", type=int, default=16)
    engine.add_argument("--num-gpu-blocks-override", type=int, default=None, dest="num_kv_blocks",
                        help="KV blocks, including the reserved block 0 (default: from max_num_seqs, <= 2 GiB)")
    engine.add_argument("--kv-cache-memory-bytes", type=int, default=None)
    engine.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
    engine.add_argument("--scheduling-policy", default="fcfs", choices=sorted(POLICIES))
    engine.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True)
    engine.add_argument("--enable-chunked-prefill", action=argparse.BooleanOptionalAction, default=True)
    engine.add_argument("--preemption-mode", default="recompute", choices=["recompute", "swap"])
    engine.add_argument("--swap-space", type=float, default=4, help="GiB of host memory for swapped KV blocks")
    engine.add_argument("--attention-backend", default="auto", choices=["auto", "reference", "pallas", "cpu"])
    engine.add_argument("--matmul-backend", default="auto", choices=["auto", "xla", "cpu"],
                        help="the decoder projections: XLA's dots, or the CPU kernel over packed weights")
    engine.add_argument("--token-buckets", type=int, nargs="+", default=None,
                        help="token counts a step is padded to (default: powers of two up to "
                             "--max-num-batched-tokens); each compiles once")
    engine.add_argument("--skip-tokenizer-init", action="store_true", help="serve token-id prompts only")


def build_engine(args: argparse.Namespace):
    """The Engine for these flags (through LLM, which turns a model name into an Engine)."""
    from jaxllm.llm import LLM

    llm = LLM(
        args.model, dtype="float32" if args.dtype == "auto" else args.dtype, seed=args.seed,
        block_size=args.block_size, num_kv_blocks=args.num_kv_blocks,
        kv_cache_memory_bytes=args.kv_cache_memory_bytes, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=args.max_model_len,
        scheduling_policy=args.scheduling_policy, enable_chunked_prefill=args.enable_chunked_prefill,
        attention_backend=args.attention_backend, matmul_backend=args.matmul_backend,
        tensor_parallel_size=args.tensor_parallel_size,
        token_buckets=tuple(args.token_buckets) if args.token_buckets else None,
        skip_tokenizer_init=args.skip_tokenizer_init, enable_prefix_caching=args.enable_prefix_caching,
        preemption_mode=args.preemption_mode, swap_space=args.swap_space,
    )
    return llm.engine


def main(args: argparse.Namespace) -> int:
    import uvicorn

    from jaxllm.async_engine import AsyncEngine
    from jaxllm.entrypoints.openai.api_server import build_app

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    start = time.monotonic()
    try:
        engine = build_engine(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"jaxllm serve: {e}", file=sys.stderr)
        return 2
    logger.info("loaded %s in %.1f s: %s", args.model, time.monotonic() - start, engine.resolved)
    if not args.skip_warmup:
        start = time.monotonic()
        n = engine.warmup()
        logger.info("warm-up: %d step compilations in %.1f s", n, time.monotonic() - start)
    async_engine = AsyncEngine(engine)
    names = args.served_model_name or [args.model]
    app = build_app(async_engine, names, api_key=args.api_key, model_path=args.model)
    logger.info("serving %s as %s on http://%s:%d%s", args.model, names, args.host, args.port,
                " (API key required)" if args.api_key else "")
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.uvicorn_log_level,
                    timeout_graceful_shutdown=5)
    finally:
        async_engine.shutdown()
    return 0
