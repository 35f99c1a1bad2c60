"""Serving benchmark: an async client sending streaming requests at Poisson arrivals to a running
OpenAI-compatible server (jaxllm serve, transformers serve, vLLM, ...), as vLLM's benchmark_serving.

    jaxllm serve smollm2-135m-instruct --port 8000 &
    python experiments/bench_serve.py --base-url http://127.0.0.1:8000 --num-prompts 64 --request-rate 4

Per request: TTFT (send to first streamed token), ITL (between streamed tokens), TPOT ((e2e - TTFT)
/ (output tokens - 1)), end-to-end latency. Reported: mean / median / p90 / p99 of each in ms,
request and token throughput over the run. Output token counts come from the stream's usage
chunk (stream_options.include_usage) when the server sends one, else from the chunks with text.
Prompts are random words from a small English list, seeded, `--input-len` words each (the server's
token count is reported from usage). Host only; needs httpx.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import os
import random
import sys
import time

import numpy as np

WORDS = ("the of and to in is was for on that with as by at from his her an be which it are this had "
         "not or have were but one all their they there been has more when who will would can about time "
         "into only other some could them these first then than its two new like people over also after "
         "years such most made many before between through where while much city world state house life "
         "water school book story music river country family system history question number night day").split()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base-url", default="http://127.0.0.1:8000", help="the server (default: %(default)s)")
    parser.add_argument("--endpoint", default="completions", choices=["completions", "chat"])
    parser.add_argument("--model", default=None, help="model name to send (default: the server's first)")
    parser.add_argument("--api-key", default=os.environ.get("JAXLLM_API_KEY") or os.environ.get("OPENAI_API_KEY"))
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--request-rate", type=float, default=math.inf,
                        help="requests per second, Poisson arrivals (default: inf, all at once)")
    parser.add_argument("--max-concurrency", type=int, default=None, help="requests in flight at most")
    parser.add_argument("--input-len", type=int, default=32, help="words per prompt")
    parser.add_argument("--words", default=None,
                        help="comma-separated words to draw prompts from (default: a small English list)")
    parser.add_argument("--output-len", type=int, default=32, help="max_tokens per request")
    parser.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false",
                        help="let requests stop at EOS (default: ignore_eos, exact output lengths)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    parser.add_argument("--label", default=None, help="name of the system in the results")
    parser.add_argument("--out", default=None, help="append the result as one JSON line to this file")


@dataclasses.dataclass
class RequestResult:
    ok: bool
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float | None = None  # seconds
    itl: list[float] = dataclasses.field(default_factory=list)
    e2e: float = 0.0
    error: str | None = None


def make_prompts(n: int, input_len: int, seed: int, words=WORDS) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(words) for _ in range(input_len)) for _ in range(n)]


def arrival_gaps(n: int, rate: float, seed: int) -> list[float]:
    """Seconds to wait before each request: exponential gaps (a Poisson process), 0 at rate inf."""
    if math.isinf(rate):
        return [0.0] * n
    rng = np.random.default_rng(seed)
    return rng.exponential(1.0 / rate, size=n).tolist()


async def send_one(client, args, model: str, prompt: str) -> RequestResult:
    body = {"model": model, "max_tokens": args.output_len, "temperature": 0.0, "stream": True,
            "stream_options": {"include_usage": True}}
    if args.ignore_eos:
        body["ignore_eos"] = True
    if args.endpoint == "chat":
        path, body["messages"] = "/v1/chat/completions", [{"role": "user", "content": prompt}]
    else:
        path, body["prompt"] = "/v1/completions", prompt
    start = time.perf_counter()
    result, last, chunks = RequestResult(ok=False), None, 0
    try:
        async with client.stream("POST", path, json=body, timeout=args.timeout) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                data = json.loads(line[6:])
                if "error" in data:
                    result.error = str(data["error"])
                    return result
                if data.get("usage"):
                    result.prompt_tokens = data["usage"].get("prompt_tokens", 0)
                    result.output_tokens = data["usage"].get("completion_tokens", 0)
                for choice in data.get("choices", []):
                    text = choice.get("text") if "text" in choice else (choice.get("delta") or {}).get("content")
                    if not text:
                        continue
                    now = time.perf_counter()
                    if last is None:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    last, chunks = now, chunks + 1
    except Exception as e:  # noqa: BLE001 - a failed request is counted, not fatal
        result.error = f"{type(e).__name__}: {e}"
        return result
    result.e2e = time.perf_counter() - start
    result.output_tokens = result.output_tokens or chunks
    result.ok = result.ttft is not None
    if not result.ok:
        result.error = "no token streamed"
    return result


async def run(args) -> dict:
    import httpx

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=args.max_concurrency or args.num_prompts + 8)
    async with httpx.AsyncClient(base_url=args.base_url, headers=headers, limits=limits,
                                 timeout=args.timeout) as client:
        model = args.model
        if model is None:
            r = await client.get("/v1/models")
            r.raise_for_status()
            model = r.json()["data"][0]["id"]
        prompts = make_prompts(args.num_prompts, args.input_len, args.seed,
                               args.words.split(",") if args.words else WORDS)
        gaps = arrival_gaps(args.num_prompts, args.request_rate, args.seed)
        gate = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None

        async def limited(prompt):
            if gate is None:
                return await send_one(client, args, model, prompt)
            async with gate:
                return await send_one(client, args, model, prompt)

        start = time.perf_counter()
        tasks = []
        for prompt, gap in zip(prompts, gaps):
            await asyncio.sleep(gap)
            tasks.append(asyncio.ensure_future(limited(prompt)))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    return summarize(results, duration, args, model)


def _stats(values_s: list[float]) -> dict:
    if not values_s:
        return {"mean": None, "median": None, "p90": None, "p99": None}
    a = np.asarray(values_s) * 1000.0
    return {"mean": float(a.mean()), "median": float(np.median(a)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99))}


def summarize(results: list[RequestResult], duration: float, args, model: str) -> dict:
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens for r in ok)
    tpot = [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    return {
        "label": args.label or args.base_url,
        "model": model,
        "endpoint": args.endpoint,
        "num_prompts": args.num_prompts,
        "request_rate": args.request_rate if not math.isinf(args.request_rate) else "inf",
        "max_concurrency": args.max_concurrency,
        "input_len_words": args.input_len,
        "output_len": args.output_len,
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if r.error})[:5],
        "duration_s": duration,
        "request_throughput": len(ok) / duration,
        "output_token_throughput": out_tokens / duration,
        "total_token_throughput": (in_tokens + out_tokens) / duration,
        "total_input_tokens": in_tokens,
        "total_output_tokens": out_tokens,
        "ttft_ms": _stats([r.ttft for r in ok]),
        "tpot_ms": _stats(tpot),
        "itl_ms": _stats([x for r in ok for x in r.itl]),
        "e2e_ms": _stats([r.e2e for r in ok]),
    }


def format_summary(s: dict) -> str:
    lines = [f"== {s['label']} ({s['model']}, {s['endpoint']}) ==",
             f"requests: {s['completed']} ok, {s['failed']} failed, rate {s['request_rate']}/s, "
             f"duration {s['duration_s']:.1f} s",
             f"throughput: {s['request_throughput']:.2f} req/s, {s['output_token_throughput']:.1f} output tok/s, "
             f"{s['total_token_throughput']:.1f} total tok/s"]
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        st = s[key]
        if st["mean"] is None:
            lines.append(f"{key:8s} n/a")
            continue
        lines.append(f"{key:8s} mean {st['mean']:9.1f}  median {st['median']:9.1f}  p90 {st['p90']:9.1f}  "
                     f"p99 {st['p99']:9.1f}")
    if s["errors"]:
        lines.append(f"errors: {s['errors']}")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    summary = asyncio.run(run(args))
    print(format_summary(summary))
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps(summary) + "\n")
    return 0 if summary["failed"] == 0 else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
