"""Soak test: thousands of random engine operations with a realistic mix of sampling parameters.

    python experiments/soak_sampling_mix.py [--ops 10000] [--seed 0] [--out results/soak.json]

A tiny random Qwen2 model, LLM(block_size=8, num_kv_blocks=60, max_num_seqs=12,
max_num_batched_tokens=64), warmed up, then `--ops` random operations on `llm.engine`:
add_request (prompts of 1-200 tokens; greedy, temperature + top-p + seed, top-k + min-p, sometimes
repetition/presence/frequency penalties, logprobs 0-4, prompt_logprobs 0-2, stop_token_ids,
min_tokens), abort_request of a live request, and step. Then it drains the engine and checks:

  * nothing crashed and no request ended with an error;
  * every request finished (stop/length) or was aborted, and no KV block is held;
  * no compilation after warm-up, and at most len(STEP_VARIANTS) step variants per token bucket;
  * resident memory after the run is within 10% of resident memory after warm-up.

Before the sampler took every parameter as data (issue 14), this workload compiled a new step for
each combination of sampling features and died of memory-mapping exhaustion after ~500 steps.
tests/test_soak.py runs a short version of the same function.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

VOCAB = 512
MAX_PROMPT = 200


def resident_bytes() -> int:
    """Current resident set size of this process (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def num_memory_mappings() -> int:
    with open("/proc/self/maps") as f:
        return sum(1 for _ in f)


def random_params(rng: np.random.Generator):
    """One request's SamplingParams from a realistic mix (the issue's list)."""
    from jaxllm import SamplingParams

    kind = rng.choice(["greedy", "top_p", "top_k"])
    kw: dict = dict(max_tokens=int(rng.integers(1, 40)))
    if kind == "top_p":
        kw.update(temperature=float(rng.uniform(0.3, 1.5)), top_p=float(rng.uniform(0.5, 1.0)),
                  seed=int(rng.integers(0, 2**31)))
    elif kind == "top_k":
        kw.update(temperature=float(rng.uniform(0.3, 1.5)), top_k=int(rng.integers(1, 50)),
                  min_p=float(rng.uniform(0.0, 0.2)))
    else:
        kw.update(temperature=0.0)
    if rng.random() < 0.25:
        kw.update(repetition_penalty=float(rng.uniform(0.8, 1.5)))
    if rng.random() < 0.2:
        kw.update(presence_penalty=float(rng.uniform(-1, 1)), frequency_penalty=float(rng.uniform(-1, 1)))
    if rng.random() < 0.3:
        kw.update(logprobs=int(rng.integers(0, 5)))
    if rng.random() < 0.15:
        kw.update(prompt_logprobs=int(rng.integers(0, 3)))
    if rng.random() < 0.2:
        kw.update(stop_token_ids=[int(t) for t in rng.integers(0, VOCAB, size=rng.integers(1, 4))])
    if rng.random() < 0.2:
        kw.update(min_tokens=int(rng.integers(0, kw["max_tokens"] + 1)))
    return SamplingParams(**kw)


def run_soak(llm, num_ops: int, seed: int = 0, max_drain_steps: int = 20_000) -> dict:
    """Drive `llm.engine` with `num_ops` random operations, drain it, and report what happened.

    Returns a dict of counts and measurements; the caller asserts on it (see check_report).
    """
    from jaxllm.runner.step_io import STEP_VARIANTS

    engine = llm.engine
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    engine.warmup()
    warmup_s = time.perf_counter() - t0
    compiles_after_warmup = engine.get_stats()["num_compilations"]
    rss_after_warmup, maps_after_warmup = resident_bytes(), num_memory_mappings()

    added, aborted, live = 0, set(), set()
    outcome: dict[str, str] = {}  # request id -> finish_reason
    errors: list[str] = []
    next_id = 0
    steps = 0

    def record(outputs):
        for out in outputs:
            if out.finished:
                live.discard(out.request_id)
                outcome[out.request_id] = out.outputs[0].finish_reason
                if out.error:
                    errors.append(f"{out.request_id}: {out.error}")

    t0 = time.perf_counter()
    for _ in range(num_ops):
        op = rng.random()
        if op < 0.25:
            rid = f"r{next_id}"
            next_id += 1
            prompt = rng.integers(0, VOCAB, size=int(rng.integers(1, MAX_PROMPT + 1))).tolist()
            engine.add_request(rid, {"prompt_token_ids": prompt}, random_params(rng))
            live.add(rid)
            added += 1
        elif op < 0.30 and live:
            rid = sorted(live)[int(rng.integers(len(live)))]
            engine.abort_request(rid)
            live.discard(rid)
            aborted.add(rid)
        else:
            record(engine.step())
            steps += 1
    while engine.has_unfinished_requests() and max_drain_steps > 0:
        record(engine.step())
        steps += 1
        max_drain_steps -= 1
    run_s = time.perf_counter() - t0

    stats = engine.get_stats()
    buckets = engine.resolved.token_buckets
    unaccounted = [f"r{i}" for i in range(next_id) if f"r{i}" not in outcome and f"r{i}" not in aborted]
    return {
        "num_ops": num_ops,
        "num_steps": steps,
        "num_requests": added,
        "num_aborted": len(aborted),
        "finish_reasons": {r: sum(v == r for v in outcome.values()) for r in sorted(set(outcome.values()))},
        "errors": errors,
        "unaccounted_requests": unaccounted,
        "unfinished_after_drain": engine.has_unfinished_requests(),
        "kv_blocks_used_at_end": stats["kv_blocks_used"],
        "warmup_s": warmup_s,
        "run_s": run_s,
        "compilations_after_warmup": stats["num_compilations"] - compiles_after_warmup,
        "num_step_variants": stats["num_step_variants"],
        "max_step_variants": len(STEP_VARIANTS) * len(buckets),
        "num_executables_in_process": stats["num_executables"],
        "num_preemptions": stats["num_preemptions"],
        "num_failed_steps": stats["num_failed_steps"],
        "rss_after_warmup_bytes": rss_after_warmup,
        "rss_at_end_bytes": resident_bytes(),
        "memory_mappings_after_warmup": maps_after_warmup,
        "memory_mappings_at_end": num_memory_mappings(),
    }


def check_report(report: dict) -> list[str]:
    """The soak's pass conditions; returns the failures (empty when it passed)."""
    problems = []
    if report["errors"]:
        problems.append(f"requests ended with errors: {report['errors'][:5]}")
    if report["unaccounted_requests"] or report["unfinished_after_drain"]:
        problems.append(f"requests neither finished nor aborted: {report['unaccounted_requests'][:5]}")
    if report["kv_blocks_used_at_end"]:
        problems.append(f"{report['kv_blocks_used_at_end']} KV blocks still held after the drain")
    if report["compilations_after_warmup"]:
        problems.append(f"{report['compilations_after_warmup']} compilations after warm-up")
    if report["num_step_variants"] > report["max_step_variants"]:
        problems.append(f"{report['num_step_variants']} step variants > bound {report['max_step_variants']}")
    growth = report["rss_at_end_bytes"] / report["rss_after_warmup_bytes"] - 1
    if growth >= 0.10:
        problems.append(f"resident memory grew {growth:.1%} after warm-up (limit 10%)")
    return problems


def make_soak_llm(model_dir: str):
    from jaxllm import LLM

    return LLM(model_dir, block_size=8, num_kv_blocks=60, max_num_seqs=12, max_num_batched_tokens=64,
               skip_tokenizer_init=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ops", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="write the report as JSON here")
    args = parser.parse_args()

    from tests.helpers.tiny_models import make_tiny_model

    model_dir = make_tiny_model(tempfile.mkdtemp(), arch="qwen2", vocab_size=VOCAB)
    report = run_soak(make_soak_llm(model_dir), args.ops, args.seed)
    report["rss_growth"] = report["rss_at_end_bytes"] / report["rss_after_warmup_bytes"] - 1
    print(json.dumps({k: v for k, v in report.items() if k != "errors"}, indent=1))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    problems = check_report(report)
    print("PASS" if not problems else "FAIL:\n  " + "\n  ".join(problems))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
