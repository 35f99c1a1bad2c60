"""Where a whole run's device time goes, by step kind and token bucket, from the engine's step records.

    python experiments/step_breakdown.py                                   # bench_vs_vllm's workload
    python experiments/step_breakdown.py --llm-kwargs '{"token_buckets": [1,2,4,8,16,32,64,128,256,512]}'

SmolLM2-135M fp32 (bench_vs_vllm's model), the performance issue's 64-request lognormal
workload, greedy with ignore_eos, after `engine.warmup()`. Prints one row per (decode or
prefill/mixed, bucket): steps, device and host seconds, ms per step and rows per step. Read with
bench_vs_vllm's numbers: it says which steps a speed-up must target (and that host time is small).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("-n", "--num-requests", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--llm-kwargs", default="{}", help="JSON dict of extra LLM(...) arguments")
    p.add_argument("--out", default=None, help="write the table as JSON here")
    args = p.parse_args(argv)

    from bench_vs_vllm import smollm2_f32_dir
    from workloads import SHAREGPT_OUTPUT, SHAREGPT_PROMPT, make_workload

    from jaxllm import LLM, SamplingParams

    # Ids 0..16 are SmolLM2's special tokens: random prompts avoid them (as bench_vs_vllm does).
    w = make_workload(args.num_requests, SHAREGPT_PROMPT, SHAREGPT_OUTPUT, 49152, args.seed,
                      avoid_ids=tuple(range(17)))
    llm = LLM(smollm2_f32_dir(), max_num_seqs=32, max_num_batched_tokens=512, max_model_len=w.max_model_len,
              skip_tokenizer_init=True, **json.loads(args.llm_kwargs))
    llm.engine.warmup()
    records = []
    llm.engine.add_step_observer(records.append)
    t0 = time.perf_counter()
    llm.generate([{"prompt_token_ids": p} for p in w.prompts],
                 [SamplingParams(max_tokens=o, temperature=0.0, ignore_eos=True) for o in w.output_lens],
                 use_tqdm=False)
    elapsed = time.perf_counter() - t0
    print(f"elapsed {elapsed:.1f} s, {sum(w.output_lens) / elapsed:.1f} output tok/s, {len(records)} steps")
    groups = collections.defaultdict(list)
    for r in records:
        groups[("prefill/mixed" if r.num_prefill_tokens else "decode", r.num_padded_tokens)].append(r)
    table = []
    for (kind, bucket), rs in sorted(groups.items()):
        device, host = sum(r.device_time for r in rs), sum(r.host_time for r in rs)
        row = {"kind": kind, "bucket": bucket, "steps": len(rs), "device_s": device, "host_s": host,
               "device_ms_per_step": 1e3 * device / len(rs), "host_ms_per_step": 1e3 * host / len(rs),
               "rows_per_step": sum(r.num_scheduled_requests for r in rs) / len(rs)}
        table.append(row)
        print(f"{kind:14s} T={bucket:4d} steps={row['steps']:4d} device={device:6.2f}s "
              f"({row['device_ms_per_step']:6.1f} ms/step) host={host:5.2f}s "
              f"({row['host_ms_per_step']:5.1f} ms/step) rows/step={row['rows_per_step']:.1f}")
    result = {"elapsed_s": elapsed, "output_tokens_per_s": sum(w.output_lens) / elapsed,
              "device_s": sum(r.device_time for r in records), "host_s": sum(r.host_time for r in records),
              "llm_kwargs": json.loads(args.llm_kwargs), "steps": table}
    print(f"total device {result['device_s']:.2f} s, host {result['host_s']:.2f} s")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
