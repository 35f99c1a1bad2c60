"""Smoke test of experiments/accelerator_check.py on CPU: the interpret-mode kernel part runs and
agrees with the float64 reference, every accelerator-only part says it was skipped, and the JSON
has one entry per part. (The engine part, pallas vs reference, is what tests/test_engine_pallas.py
already covers; it is left out here to keep the suite fast.)"""

import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments"))


@pytest.mark.slow
def test_accelerator_check_on_cpu(tmp_path):
    import jax

    import accelerator_check

    if jax.default_backend() != "cpu":
        pytest.skip("the CPU smoke run; on an accelerator run the script itself")
    out = tmp_path / "check.json"
    result = accelerator_check.main(["--quick", "--parts", "kernel", "--out", str(out),
                                     "--cache-dir", str(tmp_path)])
    saved = json.loads(out.read_text())
    assert saved["ok"] and result["ok"] and saved["platform"] == "cpu"
    parts = saved["parts"]
    kernel = parts["kernel:float32"]
    assert kernel["kernel"] == "tpu-interpret" and not kernel["compiled"]
    assert kernel["max_abs_err"] <= kernel["tolerance"] and len(kernel["cases"]) == 1
    for name in ("kernel:compiled", "bandwidth:decode-8x1k", "throughput"):
        assert "skipped" in parts[name], name
    assert parts["engine"]["skipped"] == "not requested (--parts)"
