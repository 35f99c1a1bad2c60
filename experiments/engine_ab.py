"""Output tok/s of two engine settings A and B, in one process (default: async scheduling off / on).

    python experiments/engine_ab.py [--rounds 2] [--quick] [-n 64] [--compilation layered]
    python experiments/engine_ab.py --a '{}' --b '{"matmul_backend": "onednn"}'

--a / --b: LLM(...) keyword arguments (JSON) of the two engines, named by --names.

The benchmark workload of experiments/bench_vs_vllm.py (SmolLM2-135M-Instruct fp32, random-id
ShareGPT-like prompts and output lengths, greedy, ignore_eos, all submitted at t=0,
max_num_seqs=32, max_num_batched_tokens=512); --quick: the tiny random Llama and 8 short
requests. Both engines warm up the greedy step variant, run one untimed pass, then alternate
`rounds` timed passes; the prefix cache is emptied after every pass, so each one prefills. Printed: output tok/s of each pass, the best per mode, B/A, whether
the tokens are identical, and per step (from the step records, the timed passes): host_time,
host_time_overlapped (host work done while a dispatched step was outstanding), fetch_wait_time
and device_time, plus the load average before and after (compare ratios measured in one run).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--quick", action="store_true")
    p.add_argument("-n", "--num-requests", type=int, default=None)
    p.add_argument("--compilation", default=None)
    p.add_argument("--a", default='{"async_scheduling": false}', help="LLM kwargs (JSON) of engine A")
    p.add_argument("--b", default='{"async_scheduling": true}', help="LLM kwargs (JSON) of engine B")
    p.add_argument("--names", default=None, help="two comma-separated names (default: sync,async for the "
                   "default --a/--b, else A,B)")
    args = p.parse_args(argv)
    defaults = (args.a, args.b) == (p.get_default("a"), p.get_default("b"))
    names = (args.names or ("sync,async" if defaults else "A,B")).split(",")
    if len(names) != 2 or names[0] == names[1]:
        raise SystemExit(f"--names needs two different names, got {args.names!r}")
    settings = dict(zip(names, (json.loads(args.a), json.loads(args.b))))
    from bench_vs_vllm import model_cost, smollm2_f32_dir, tiny_llama_dir
    from workloads import SHAREGPT_OUTPUT, SHAREGPT_PROMPT, make_workload

    from jaxllm import LLM, SamplingParams
    from jaxllm.runner.sampling_inputs import GREEDY

    load_start = os.getloadavg()
    model = tiny_llama_dir() if args.quick else smollm2_f32_dir()
    n = args.num_requests or (8 if args.quick else 64)
    work = make_workload(n, "uniform:4:40" if args.quick else SHAREGPT_PROMPT,
                         "uniform:2:12" if args.quick else SHAREGPT_OUTPUT,
                         vocab_size=model_cost(model)["vocab_size"], seed=0,
                         avoid_ids=tuple(range(3 if args.quick else 17)))
    max_model_len = max(len(q) + o for q, o in zip(work.prompts, work.output_lens))
    prompts = [{"prompt_token_ids": q} for q in work.prompts]
    params = [SamplingParams(max_tokens=o, temperature=0.0, ignore_eos=True) for o in work.output_lens]
    llms, records = {}, {}
    for mode, kwargs in settings.items():
        llm = LLM(model, **{"max_num_seqs": 32, "max_num_batched_tokens": 512, "max_model_len": max_model_len,
                            "skip_tokenizer_init": True, "compilation": args.compilation, **kwargs})
        llm.engine.warmup(step_variants=((GREEDY, False),))
        llm.generate(prompts, params, use_tqdm=False)  # untimed
        # Every pass prefills its prompts, as bench_vs_vllm's one pass does: without this the
        # timed passes found every prompt in the prefix cache the untimed one filled.
        assert llm.reset_prefix_cache()
        records[mode] = []
        llm.engine.add_step_observer(records[mode].append)
        llms[mode] = llm
    passes, tokens = {m: [] for m in llms}, {}
    for _ in range(args.rounds):
        for mode, llm in llms.items():
            before = llm.get_stats()["num_compilations"]
            t = time.perf_counter()
            outs = llm.generate(prompts, params, use_tqdm=False)
            wall = time.perf_counter() - t
            assert llm.reset_prefix_cache()
            assert llm.get_stats()["num_compilations"] == before, "compiled in steady state"
            tokens[mode] = [o.outputs[0].token_ids for o in outs]
            passes[mode].append(sum(map(len, tokens[mode])) / wall)
    per_step = {}
    for mode, recs in records.items():
        per_step[mode] = {f"{k}_ms": 1e3 * statistics.mean(getattr(r, k) for r in recs)
                          for k in ("host_time", "host_time_overlapped", "fetch_wait_time", "device_time")}
        per_step[mode]["num_records"] = len(recs)
    a, b = names
    result = {
        "model": model, "workload": work.summary(), "compilation": args.compilation or "layered",
        "settings": settings, "tok_s": passes, "best": {m: max(v) for m, v in passes.items()},
        "tokens_identical": tokens[a] == tokens[b], "per_step": per_step,
        "async_steps": {m: {"overlapped": s["num_async_overlapped_steps"], "sync": s["num_async_sync_steps"]}
                        for m, s in ((m, llm.get_stats()) for m, llm in llms.items())},
        "loadavg_start": load_start, "loadavg_end": os.getloadavg(),
    }
    result[f"{b}_over_{a}"] = result["best"][b] / result["best"][a]
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
