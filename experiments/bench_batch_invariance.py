"""Batch-invariant mode: its cost (tok/s against the default mode) and the default mode's drift.

    python experiments/bench_batch_invariance.py            # tiny random Llama, a few minutes
    python experiments/bench_batch_invariance.py --out experiments/results/batch_invariance.json

Drift: one target request (greedy, top-20 logprobs at every step) runs alone, then in five other
scenarios (two batch companies, a 16-token chunk budget, the prefix cache filled by another
request, preemption by recompute and by swap). Per scenario and mode: the largest |logprob|
difference from the alone run over the top-20 entries both runs report, and the generated
tokens that differ (token flips). Cost: one timed generate of N mixed-length greedy requests per
mode after warm-up, in the same process (compare the ratio, not the absolute numbers).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _ids(rng, n, vocab):
    return {"prompt_token_ids": rng.integers(3, vocab, size=n).tolist()}


def run_scenarios(model_dir, batch_invariant: bool, vocab: int, max_tokens: int) -> dict:
    from jaxllm import LLM, SamplingParams

    rng = np.random.default_rng(0)
    target = _ids(rng, 70, vocab)
    target_params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, logprobs=20)
    preemptions = []
    base = dict(num_kv_blocks=20, max_num_seqs=8, token_buckets=(16, 64), skip_tokenizer_init=True,
                batch_invariant=batch_invariant)

    def run(llm, company=(), before=(), company_tokens=12):
        if before:
            llm.generate(list(before), SamplingParams(temperature=0.0, max_tokens=2), use_tqdm=False)
        greedy = SamplingParams(temperature=0.0, max_tokens=company_tokens, ignore_eos=True)
        outs = llm.generate(list(company) + [target], [greedy] * len(company) + [target_params], use_tqdm=False)
        comp = outs[-1].outputs[0]
        preemptions.append(outs[-1].metrics.num_preemptions)
        return comp.token_ids, [{t: e.logprob for t, e in entry.items()} for entry in comp.logprobs]

    wide = lambda **kw: LLM(model_dir, max_num_batched_tokens=64, **{**base, **kw})  # noqa: E731
    alone = run(wide())
    scenarios = {
        "batched_short_company": lambda: run(wide(), company=[_ids(rng, 10 + 7 * i, vocab) for i in range(3)]),
        "batched_long_company": lambda: run(wide(), company=[_ids(rng, 33 + 7 * i, vocab) for i in range(2)]),
        "chunked_budget_16": lambda: run(LLM(model_dir, max_num_batched_tokens=16, **base)),
        "prefix_cached": lambda: run(wide(), before=[{"prompt_token_ids": target["prompt_token_ids"][:40]}]),
        # Three 62-token requests and the target fill 17 of 19 blocks; when the three need a
        # fifth block, the newest (the target) is preempted.
        "preempted_recompute": lambda: run(wide(enable_prefix_caching=False),
                                           company=[_ids(rng, 62, vocab) for _ in range(3)], company_tokens=40),
        "preempted_swap": lambda: run(wide(enable_prefix_caching=False, preemption_mode="swap"),
                                      company=[_ids(rng, 62, vocab) for _ in range(3)], company_tokens=40),
    }
    result = {}
    for name, scenario in scenarios.items():
        tokens, logprobs = scenario()
        diffs = [abs(a[t] - b[t]) for a, b in zip(alone[1], logprobs) for t in a.keys() & b.keys()]
        result[name] = {
            "max_abs_logprob_diff": float(max(diffs)) if diffs else 0.0,
            "bitwise_identical": tokens == alone[0] and logprobs == alone[1],
            "token_flips": sum(a != b for a, b in zip(tokens, alone[0])),
            "target_preemptions": preemptions[-1],
        }
    return result


def throughput(model_dir, batch_invariant: bool, num_requests: int, vocab: int) -> dict:
    from jaxllm import LLM, SamplingParams

    rng = np.random.default_rng(1)
    llm = LLM(model_dir, num_kv_blocks=256, max_num_seqs=16, max_num_batched_tokens=128, skip_tokenizer_init=True,
              batch_invariant=batch_invariant)
    llm.engine.warmup(step_variants=(("greedy", False),))
    prompts = [_ids(rng, int(n), vocab) for n in rng.integers(8, 160, size=num_requests)]
    params = [SamplingParams(temperature=0.0, max_tokens=int(m), ignore_eos=True)
              for m in rng.integers(8, 48, size=num_requests)]
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outs) + sum(len(p["prompt_token_ids"]) for p in prompts)
    return {"seconds": elapsed, "tokens": tokens, "tok_per_s": tokens / elapsed,
            "num_compilations_incl_warmup": llm.get_stats()["num_compilations"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden-size", type=int, default=128)
    ap.add_argument("--num-layers", type=int, default=4)
    ap.add_argument("--num-requests", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from tests.helpers.tiny_models import make_tiny_model

    vocab = 512
    model_dir = make_tiny_model(tempfile.mkdtemp(), arch="llama", hidden_size=args.hidden_size,
                                intermediate_size=4 * args.hidden_size, num_hidden_layers=args.num_layers,
                                vocab_size=vocab)
    report = {"load_start": os.getloadavg()[0], "model": vars(args)}
    for mode in (False, True):
        key = "batch_invariant" if mode else "default"
        report[key] = {"drift": run_scenarios(model_dir, mode, vocab, args.max_tokens),
                       "throughput": throughput(model_dir, mode, args.num_requests, vocab)}
    report["tok_per_s_ratio_invariant_over_default"] = (
        report["batch_invariant"]["throughput"]["tok_per_s"] / report["default"]["throughput"]["tok_per_s"])
    report["load_end"] = os.getloadavg()[0]
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
