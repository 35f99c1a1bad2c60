"""Request-length distributions for the experiment scripts; the code lives in
jaxllm/bench/workloads.py (specs `fixed:N`, `uniform:LO:HI`, `lognormal:MEDIAN:SIGMA:LO:HI`).
`make_workload` keeps the experiments' older call: (N, prompt spec, output spec, vocab, seed)."""

from __future__ import annotations

import os
import sys

# Appended, not inserted first: a benchmark worker measuring another checkout of jaxllm (bench_vs_vllm's
# --baseline-ref puts it on PYTHONPATH) must import that one, not this repository's.
sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxllm.bench.workloads import SHAREGPT_OUTPUT, SHAREGPT_PROMPT, SPECIAL_IDS, LengthDist, Workload, random_workload  # noqa: E402,F401


def make_workload(num_requests: int, prompt_dist: str, output_dist: str, vocab_size: int, seed: int = 0,
                  avoid_ids: tuple[int, ...] = ()) -> Workload:
    """N random-id prompts with lengths from the two specs (special ids 0..2 avoided, and any
    id in `avoid_ids`: a real tokenizer's special tokens, e.g. SmolLM2's 0..16)."""
    special_ids = tuple(sorted(set(avoid_ids) | set(SPECIAL_IDS)))
    return random_workload(num_requests, prompt_dist, output_dist, vocab_size, seed, special_ids=special_ids)
