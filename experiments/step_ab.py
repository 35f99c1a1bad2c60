"""Steady decode throughput, fused vs layered step compilation, in one process (issue 10).

    python experiments/step_ab.py [--rounds 2]

SmolLM2-135M, one 32-token bucket (so each mode compiles one bucket): 32 requests with 8-token
prompts generate 64 greedy tokens each (8 prefill steps, then 32-row decode steps). After one
untimed pass per mode, the modes alternate `rounds` times; printed: output tok/s of each pass,
the best per mode, the layered/fused ratio, and the host seconds per step the runner spent
dispatching (execute's wall minus the device wait is not separable on CPU; the ratio is what
counts). Compare under the load printed (uptime).
"""

from __future__ import annotations

import argparse
import json
import os
import time


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args(argv)
    from jaxllm import LLM, SamplingParams

    prompts = [{"prompt_token_ids": [(7 * i + j) % 40000 + 100 for j in range(8)]} for i in range(32)]
    params = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True)
    llms = {m: LLM("smollm2-135m-instruct", max_num_seqs=32, max_num_batched_tokens=32, token_buckets=(32,),
                   max_model_len=1024, skip_tokenizer_init=True, compile_cache_dir=None, compilation=m)
            for m in ("fused", "layered")}
    tokens = {}
    for m, llm in llms.items():
        llm.generate(prompts, params, use_tqdm=False)  # compiles; untimed
        tokens[m] = None
    passes = {m: [] for m in llms}
    for _ in range(args.rounds):
        for m, llm in llms.items():
            before = llm.get_stats()["num_compilations"]
            t = time.perf_counter()
            outs = llm.generate(prompts, params, use_tqdm=False)
            wall = time.perf_counter() - t
            assert llm.get_stats()["num_compilations"] == before
            tokens[m] = [o.outputs[0].token_ids for o in outs]
            passes[m].append(sum(map(len, tokens[m])) / wall)
    result = {"tok_s": passes, "best": {m: max(v) for m, v in passes.items()},
              "tokens_identical": tokens["fused"] == tokens["layered"], "loadavg": os.getloadavg()}
    result["layered_over_fused"] = result["best"]["layered"] / result["best"]["fused"]
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
