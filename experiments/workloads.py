"""Request-length distributions for the experiment scripts; the code lives in
jaxllm/bench/workloads.py (specs `fixed:N`, `uniform:LO:HI`, `lognormal:MEDIAN:SIGMA:LO:HI`).
`make_workload` keeps the experiments' older call: (N, prompt spec, output spec, vocab, seed)."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import dataclasses  # noqa: E402

import numpy as np  # noqa: E402

from jaxllm.bench.workloads import SHAREGPT_OUTPUT, SHAREGPT_PROMPT, LengthDist, Workload, random_workload  # noqa: E402,F401


def make_workload(num_requests: int, prompt_dist: str, output_dist: str, vocab_size: int, seed: int = 0,
                  avoid_ids: tuple[int, ...] = ()) -> Workload:
    """N random-id prompts with lengths from the two specs (special ids 0..2 avoided, and any
    id in `avoid_ids`: a real tokenizer's special tokens, e.g. SmolLM2's 0..16)."""
    workload = random_workload(num_requests, prompt_dist, output_dist, vocab_size, seed)
    if not avoid_ids:
        return workload
    # Same lengths; every id drawn again from the ids above the highest avoided one.
    lo = max(avoid_ids) + 1
    rng = np.random.default_rng(seed + 1)
    requests = [dataclasses.replace(r, prompt_token_ids=tuple(rng.integers(lo, vocab_size, r.prompt_len).tolist()))
                for r in workload.requests]
    return Workload(requests, {**workload.description, "avoid_ids": f"0..{lo - 1}"})
