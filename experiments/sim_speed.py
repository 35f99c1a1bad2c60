"""How fast the simulator runs: 10,000 requests through SimulatedEngine (the real scheduler,
policies and KV-cache manager) on a Llama-3-8B-shaped model with the H100 profile.

    python experiments/sim_speed.py                 # 10,000 requests, prints the time and a profile split
    python experiments/sim_speed.py -n 2000 --profile

Workload: ShareGPT-like lengths (experiments/workloads.py: prompts lognormal median 64, outputs
median 48, long tails), Poisson arrivals at --rate, ignore_eos. The simulated times are a model,
not a measurement; what this script measures is the simulator's own wall time.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from jaxllm.bench.workloads import SHAREGPT_OUTPUT, SHAREGPT_PROMPT, LengthDist  # noqa: E402

import numpy as np  # noqa: E402

from jaxllm import CacheConfig, EngineConfig, SchedulerConfig  # noqa: E402
from jaxllm.bench import TimedDriver, arrival_times  # noqa: E402
from jaxllm.bench.workloads import lengths_workload  # noqa: E402
from jaxllm.sim import SimulatedEngine  # noqa: E402

LLAMA3_8B = dict(architectures=["LlamaForCausalLM"], vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                 num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-5,
                 max_position_embeddings=8192, eos_token_id=128001, rope_theta=500000.0)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", "--num-requests", type=int, default=10_000)
    ap.add_argument("--rate", type=float, default=200.0, help="requests/s (simulated time)")
    ap.add_argument("--max-num-seqs", type=int, default=128)
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    ap.add_argument("--num-kv-blocks", type=int, default=4000)
    ap.add_argument("--hardware", default="h100-sxm")
    ap.add_argument("--profile", action="store_true", help="cProfile the run and print the top functions")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    rng = np.random.default_rng(0)
    prompts = LengthDist.parse(SHAREGPT_PROMPT).sample(args.num_requests, rng)
    outputs = LengthDist.parse(SHAREGPT_OUTPUT).sample(args.num_requests, rng)
    workload = lengths_workload(prompts, outputs, LLAMA3_8B["vocab_size"])
    arrivals = arrival_times(args.num_requests, args.rate, seed=1)
    config = EngineConfig(model="llama-3-8b (config only)", dtype="bfloat16",
                          cache=CacheConfig(block_size=16, num_kv_blocks=args.num_kv_blocks),
                          scheduler=SchedulerConfig(max_num_seqs=args.max_num_seqs,
                                                    max_num_batched_tokens=args.max_num_batched_tokens,
                                                    max_model_len=1024))
    sim = SimulatedEngine(config, LLAMA3_8B, args.hardware)
    prof = cProfile.Profile() if args.profile else None
    t0 = time.perf_counter()
    if prof:
        prof.enable()
    run = TimedDriver(sim).run(workload, arrivals)
    if prof:
        prof.disable()
    wall = time.perf_counter() - t0
    stats = sim.get_stats()
    result = {
        "num_requests": args.num_requests,
        "wall_s": wall,
        "num_steps": len(run.steps),
        "steps_per_s": len(run.steps) / wall,
        "num_preemptions": stats["num_preemptions"],
        "simulated (a model, not a measurement)": run.summary(),
        "hardware_profile": args.hardware,
    }
    print(json.dumps(result, indent=2))
    print(f"simulated {args.num_requests} requests ({len(run.steps)} steps) in {wall:.1f} s wall")
    if prof:
        pstats.Stats(prof).sort_stats("tottime").print_stats(15)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
