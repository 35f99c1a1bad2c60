"""This machine's roofline with JAX (peak matmul FLOP/s and memory bandwidth); the code lives in
jaxllm/bench/roofline.py, which every benchmark calls at the start of its run.

    python experiments/roofline.py            # prints JSON
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxllm.bench.roofline import measure_roofline, roofline_time  # noqa: E402,F401

if __name__ == "__main__":
    r = measure_roofline()
    print(json.dumps(r, indent=2))
    print(f"matmul {r['matmul_flops'] / 1e9:.0f} GFLOP/s, read {r['read_bandwidth'] / 1e9:.1f} GB/s, "
          f"copy {r['copy_bandwidth'] / 1e9:.1f} GB/s")
