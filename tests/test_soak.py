"""Bounded compilation under any mix of sampling parameters (issue 14), as a seeded soak: random
add / abort / step operations with varied SamplingParams on a small engine. The long version is
`python experiments/soak_sampling_mix.py --ops 10000`; this is the same function, shorter."""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments"))

from soak_sampling_mix import check_report, make_soak_llm, run_soak  # noqa: E402
from tests.helpers.tiny_models import make_tiny_model  # noqa: E402


def test_random_operations_stay_within_the_compile_bound(tmp_path):
    llm = make_soak_llm(make_tiny_model(tmp_path, arch="qwen2"))
    report = run_soak(llm, num_ops=400, seed=1)
    assert check_report(report) == []
    # The workload really exercised what it claims to (guards against a vacuous pass).
    assert report["num_requests"] > 50 and report["num_aborted"] > 0
    assert report["num_preemptions"] > 0
    assert {"stop", "length"} <= set(report["finish_reasons"])
    assert report["num_step_variants"] > len(llm.engine.resolved.token_buckets)
