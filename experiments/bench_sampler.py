"""What taking every sampling parameter as data costs, at a 32-row decode step (issue 14).

    python experiments/bench_sampler.py [--reps 15] [--baseline-rev ffab2c3] [--out results/x.json]

Model: bench_throughput's random 138M Llama (V = 32000, fp32), 32 requests decoding at ~130
tokens of context. For each sampling mix of the 32 rows it reports, all in one run:

  step_ms        the whole engine step (runner.execute: forward + the sampler the builder chose)
  sampler_ms     the sampler alone on [32, V] logits (today: GREEDY or GENERAL)
  baseline_ms    the sampler alone as of --baseline-rev, whose features were jit statics: one
                 executable per feature combination, each specialised to its batch
  hf_ms          transformers' logits processors + sampling on the same logits (torch, the peer)
  overhead       (sampler_ms - baseline_ms) / (step_ms - sampler_ms + baseline_ms): the change of
                 the decode step time against the specialised baseline
  hf_over_ours   hf_ms / sampler_ms (> 1: our sampler is faster than transformers')

plus `greedy_forced_general`: an all-greedy batch pushed through the GENERAL sampler, i.e. what
the GREEDY fast path saves. The roofline (measured at the start) gives the step's fraction of the
machine's read bandwidth (weights + KV bytes per step / time).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "experiments"))

NUM_ROWS = 32
PROMPT_LEN = 128
# The commit before issue 14: the sampler's features were jit statics (SamplingFlags).
DEFAULT_BASELINE_REV = "ffab2c3"
BASELINE_FILES = ("jaxllm/sampling.py", "jaxllm/sampling_params.py", "jaxllm/runner/sampling_inputs.py")


def load_baseline(rev: str):
    """The baseline's sampler as a separate package `_baseline_sampler` (read with `git show`)."""
    pkg = "_baseline_sampler"
    root = tempfile.mkdtemp()
    for path in BASELINE_FILES:
        src = subprocess.run(["git", "-C", ROOT, "show", f"{rev}:{path}"], check=True,
                             capture_output=True, text=True).stdout
        src = src.replace("from jaxllm.", f"from {pkg}.")
        dest = os.path.join(root, pkg, os.path.relpath(path, "jaxllm"))
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        for d in (os.path.join(root, pkg), os.path.dirname(dest)):
            open(os.path.join(d, "__init__.py"), "a").close()
        with open(dest, "w") as f:
            f.write(src)
    sys.path.insert(0, root)
    import importlib

    return (importlib.import_module(f"{pkg}.sampling"), importlib.import_module(f"{pkg}.runner.sampling_inputs"),
            importlib.import_module(f"{pkg}.sampling_params"))


def mixes(num_rows: int, vocab: int) -> dict:
    """name -> builder(SamplingParams class) of the rows' parameters."""
    def rows(make):
        return lambda sp: [make(sp, i) for i in range(num_rows)]

    kinds = {
        "greedy": rows(lambda sp, i: sp(temperature=0.0)),
        "temperature": rows(lambda sp, i: sp(temperature=0.8, seed=i)),
        "top_k_top_p": rows(lambda sp, i: sp(temperature=0.8, top_k=50, top_p=0.9, seed=i)),
        "penalties": rows(lambda sp, i: sp(temperature=0.0, repetition_penalty=1.2, presence_penalty=0.5)),
        "logprobs_5": rows(lambda sp, i: sp(temperature=0.0, logprobs=5)),
    }
    order = list(kinds)
    kinds["mixed"] = lambda sp: [kinds[order[i % len(order)]](sp)[i] for i in range(num_rows)]
    return kinds


def best_ms(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


def decode_engine(model_dir: str):
    """An engine holding 32 requests that have finished their prefill; returns (llm, decode plan)."""
    from jaxllm import LLM, SamplingParams

    llm = LLM(model_dir, max_num_seqs=NUM_ROWS, max_num_batched_tokens=512, max_model_len=1024,
              skip_tokenizer_init=True, token_buckets=(NUM_ROWS, 512))
    rng = np.random.default_rng(0)
    engine = llm.engine
    for i in range(NUM_ROWS):
        prompt = rng.integers(3, 32000, size=PROMPT_LEN).tolist()
        engine.add_request(f"r{i}", {"prompt_token_ids": prompt},
                           SamplingParams(temperature=0.0, max_tokens=500, ignore_eos=True))
    while any(r.num_computed_tokens < r.num_prompt_tokens for r in engine.scheduler.requests.values()):
        engine.step()
    plan = engine.scheduler.schedule()  # 32 decode rows (timed below, never updated)
    assert len(plan.scheduled) == NUM_ROWS and all(item.num_new_tokens == 1 for item in plan.scheduled)
    return llm, plan


def hf_sampler(torch, transformers, params, logits, history):
    """transformers' way: a LogitsProcessorList per distinct parameter set, then sample/argmax."""
    from transformers import generation as g

    procs = []
    p = params[0]
    if p.repetition_penalty != 1.0:
        procs.append(g.RepetitionPenaltyLogitsProcessor(p.repetition_penalty))
    if p.temperature > 0:
        procs.append(g.TemperatureLogitsWarper(p.temperature))
        if p.top_k:
            procs.append(g.TopKLogitsWarper(p.top_k))
        if p.top_p < 1:
            procs.append(g.TopPLogitsWarper(p.top_p))
    plist = g.LogitsProcessorList(procs)

    def run():
        with torch.no_grad():
            scores = plist(history, logits.clone())
            if p.temperature > 0:
                return torch.multinomial(torch.softmax(scores, -1), 1)
            if p.logprobs:
                torch.topk(torch.log_softmax(scores, -1), p.logprobs)
            return scores.argmax(-1)

    return run


def _fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--baseline-rev", default=DEFAULT_BASELINE_REV)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    import jax
    import torch
    import transformers

    import bench_throughput
    from roofline import measure_roofline
    from jaxllm import SamplingParams
    from jaxllm.runner.sampling_inputs import build_sampling_inputs
    from jaxllm.runner.step_io import StepInputs
    from jaxllm.sampling import sample

    roof = measure_roofline()
    print(f"roofline: {roof['matmul_flops'] / 1e9:.0f} GFLOP/s matmul, {roof['read_bandwidth'] / 1e9:.1f} GB/s read")
    old_sampling, old_inputs, old_params = load_baseline(args.baseline_rev)

    model_dir = bench_throughput.build_model(bench_throughput.DEFAULT_MODEL,
                                             os.path.expanduser("~/.cache/jaxllm/bench_models"))
    llm, plan = decode_engine(model_dir)
    engine, runner = llm.engine, llm.engine.runner
    cfg = runner.config
    vocab, history_width = cfg.vocab_size, engine.resolved.max_model_len
    decode = engine.build_step_inputs(plan.scheduled)
    param_bytes = sum(x.nbytes for x in jax.tree.leaves(runner.params))
    kv_bytes = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 4 * int(decode.batch.kv_lens.sum())

    logits = jax.random.normal(jax.random.PRNGKey(0), (NUM_ROWS, vocab), np.float32) * 3
    torch_logits = torch.from_numpy(np.array(logits))
    new_jit = jax.jit(sample, static_argnames="sampler")
    results = {}
    for name, make_rows in mixes(NUM_ROWS, vocab).items():
        rows_new = []
        for i, (p, item) in enumerate(zip(make_rows(SamplingParams), plan.scheduled)):
            req = item.request
            rows_new.append((p, i, req.prompt_token_ids, req.output_token_ids, (2,)))
        inputs, sampler = build_sampling_inputs(rows_new, NUM_ROWS, vocab_size=vocab, history_width=history_width)
        step = StepInputs(decode.batch, inputs, sampler)
        dev_inputs = jax.device_put(inputs.with_neutral_arrays(history_width, vocab))

        old_rows = [(old_params.SamplingParams(**{k: getattr(p, k) for k in (
            "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "presence_penalty",
            "frequency_penalty", "logprobs", "max_tokens")}), *rest) for p, *rest in rows_new]
        arrays, flags = old_inputs.build_sampling_arrays(old_rows, NUM_ROWS)
        old_dev = jax.device_put(old_sampling.SamplingInputs.from_arrays(arrays))

        # transformers needs a rectangular history: the prompts (all PROMPT_LEN long).
        history = torch.from_numpy(np.asarray([list(r[2]) for r in rows_new], np.int64))
        r = {
            "sampler": sampler,
            "step_ms": best_ms(lambda: runner.execute(step), args.reps),
            "sampler_ms": best_ms(lambda: new_jit(logits, dev_inputs, sampler=sampler).token_ids.block_until_ready(),
                                  args.reps),
            "baseline_ms": best_ms(lambda: old_sampling.sample_jit(logits, old_dev, flags=flags)
                                   .token_ids.block_until_ready(), args.reps),
            # transformers applies one parameter set to a whole batch: no peer for a mixed batch.
            "hf_ms": None if name == "mixed" else best_ms(
                hf_sampler(torch, transformers, make_rows(SamplingParams), torch_logits, history), args.reps),
        }
        baseline_step = r["step_ms"] - r["sampler_ms"] + r["baseline_ms"]
        r["overhead"] = (r["sampler_ms"] - r["baseline_ms"]) / baseline_step
        r["hf_over_ours"] = r["hf_ms"] / r["sampler_ms"] if r["hf_ms"] is not None else None
        r["step_read_bw_fraction"] = (param_bytes + kv_bytes) / (r["step_ms"] / 1e3) / roof["read_bandwidth"]
        results[name] = r
        print(f"{name:12s} {sampler:8s} step {r['step_ms']:7.2f} ms  sampler {r['sampler_ms']:6.2f} ms  "
              f"baseline {r['baseline_ms']:6.2f} ms  hf {_fmt(r['hf_ms'], '6.2f')} ms  overhead {100 * r['overhead']:+5.1f}%  "
              f"hf/ours {_fmt(r['hf_over_ours'], '4.1f')}x  bw {100 * r['step_read_bw_fraction']:4.1f}%")

    greedy_rows = [(SamplingParams(temperature=0.0), i, [], [], ()) for i in range(NUM_ROWS)]
    forced, _ = build_sampling_inputs(greedy_rows, NUM_ROWS, vocab_size=vocab, history_width=history_width,
                                      force_general=True)
    forced_ms = best_ms(lambda: runner.execute(StepInputs(decode.batch, forced, "general")), args.reps)
    results["greedy_forced_general"] = {"step_ms": forced_ms,
                                        "vs_greedy_fast_path": forced_ms / results["greedy"]["step_ms"] - 1}
    print(f"all-greedy batch on the GENERAL sampler: step {forced_ms:.2f} ms "
          f"({100 * results['greedy_forced_general']['vs_greedy_fast_path']:+.1f}% vs the GREEDY fast path)")
    report = {"roofline": roof, "baseline_rev": args.baseline_rev, "num_rows": NUM_ROWS, "vocab": vocab,
              "compilations": engine.get_stats()["num_compilations"], "results": results}
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
