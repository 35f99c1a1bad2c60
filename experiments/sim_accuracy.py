"""Does the simulator predict a real run it was not fitted on? Throughput and mean / p90 TTFT,
measured on this CPU against jaxllm.sim's prediction.

    python experiments/sim_accuracy.py            # ~2 min on 2 quiet cores; prints the error table
    python experiments/sim_accuracy.py --quick    # smoke run: tiny model, few requests
    python experiments/sim_accuracy.py --record runs.pkl; ... --from-record runs.pkl   # refit without re-measuring

1. Record: one real Engine (a random-init Llama, fp32, warmed up so nothing compiles in a run)
   runs every workload below through jaxllm.bench's TimedDriver (Poisson arrivals on the wall clock,
   ignore_eos), with a step observer, --repeats times (round-robin, the same requests and
   arrivals each time): "measured" is the median over the repeats, and their largest distance
   from it ("repeats' spread") is how far this machine's noise alone moves a number.
2. Fit: a LinearCostModel to the step tables of the FIT workloads only (jaxllm.sim.fit, optax).
3. Predict: a SimulatedEngine with that cost model runs the same requests of the EVAL workloads
   (other rates, other length distributions) and we compare. Also each run is replayed
   (decisions must match step for step), and the first-principles roofline of this machine
   (experiments/roofline.py's measurement; a model, not a measurement) is shown beside.

Writes experiments/results/sim_accuracy.json and the fitted cost model (sim_cost_model_cpu.json).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import numpy as np  # noqa: E402

import bench_throughput  # noqa: E402  (build_model: the random Llama the other benchmarks use)
from jaxllm import CacheConfig, Engine, EngineConfig, SchedulerConfig  # noqa: E402
from jaxllm.runner.sampling_inputs import GREEDY  # noqa: E402
from jaxllm.bench import TimedDriver, arrival_times  # noqa: E402
from jaxllm.bench.workloads import LengthDist, lengths_workload  # noqa: E402
from jaxllm.sim import (  # noqa: E402
    HardwareProfile, ModelCosts, RooflineCostModel, SimulatedEngine, model_config_from, replay, step_table,
)
from jaxllm.sim.fit import fit_cost_model  # noqa: E402

MODEL = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=768, vocab_size=4096, tie_word_embeddings=False)
QUICK_MODEL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
                   vocab_size=512, tie_word_embeddings=False)

# (name, role, num_requests, prompt lengths, output lengths, load). load: "offline" (all at once),
# or the offered load as a fraction of this machine's measured capacity: the Poisson rate is
# load x (output tokens/s of the first, offline run) / (the workload's mean output length). Rates
# are set this way because the machine is shared and its speed changes: a fixed rate that is
# light one hour saturates it the next, and a saturated queue makes TTFT all queueing.
# Fit and eval runs alternate, so both sets see the same drift of the machine's load.
WORKLOADS = [
    ("offline-uniform", "fit", 48, "uniform:16:160", "uniform:8:64", "offline"),
    ("uniform@0.7", "eval", 40, "uniform:16:160", "uniform:8:64", 0.7),
    ("uniform@0.5", "fit", 40, "uniform:16:160", "uniform:8:64", 0.5),
    ("offline-lognormal", "eval", 48, "lognormal:48:0.8:8:320", "lognormal:24:0.8:4:128", "offline"),
    ("lognormal@0.6", "fit", 48, "lognormal:48:0.8:8:320", "lognormal:24:0.8:4:128", 0.6),
    ("long-prompts@0.3", "eval", 24, "uniform:192:320", "fixed:16", 0.3),
    ("chatty@0.6", "eval", 32, "fixed:24", "uniform:32:96", 0.6),
    # A calibration run, as one would record to fit a cost model: prompt lengths spread over the
    # whole range (short first chunks to third chunks of 480-token prompts), so the fit sees the
    # attention's reads vary apart from the batch's size (with short prompts only they move
    # together, and the fit's split between them swung from run to run). Refitting four recorded
    # sets of runs with and without it: worst held-out error 7.2 / 16.4 / 11.7 / 17.5% with it,
    # 6.6 / 32.8 / 29.1 / 10.3% without.
    ("calibration@0.5", "fit", 40, "uniform:8:480", "uniform:4:48", 0.5),
]


def workload_requests(spec, vocab_size: int, seed: int, scale: float = 1.0, capacity_tok_s: float | None = None):
    """(Workload, arrival offsets); capacity_tok_s (output tokens/s offline) sets the rate of a loaded one."""
    name, _, n, p, o, load = spec
    n = max(4, int(n * scale))
    rng = np.random.default_rng(seed)
    prompts = LengthDist.parse(p).sample(n, rng)
    outputs = LengthDist.parse(o).sample(n, rng)
    rate = math.inf if load == "offline" else load * capacity_tok_s / float(np.mean(outputs))
    return (lengths_workload(prompts, outputs, vocab_size, seed=seed + 2, prefix=f"{name}-"),
            arrival_times(n, rate, seed=seed + 1))


KEYS = ("output_throughput", "mean_ttft_ms", "p90_ttft_ms")  # jaxllm.bench.metrics.summarize's names


def measure(engine, model_kwargs: dict, scale: float, repeats: int) -> dict:
    """Run every workload `repeats` times on the real engine: {name: (spec, (requests, arrivals),
    [DriverResult per repeat])}."""
    t = time.perf_counter()
    engine.warmup(step_variants=((GREEDY, False),))
    print(f"warm-up (compilation) {time.perf_counter() - t:.1f} s")
    # One untimed run first: the first real steps touch the KV cache's pages for the first time.
    TimedDriver(engine).run(*workload_requests(WORKLOADS[0], model_kwargs["vocab_size"], seed=999, scale=scale))

    compiled = engine.get_stats()["num_compilations"]
    runs = {spec[0]: (spec, None, []) for spec in WORKLOADS}  # name -> (spec, requests, [run per repeat])
    capacity = None
    # Every workload runs `repeats` times, round-robin, with the same requests and arrivals: the
    # prediction is compared with the median, and the spread between repeats is the noise floor.
    for rep in range(repeats):
        for i, spec in enumerate(WORKLOADS):
            name = spec[0]
            reqs = runs[name][1] or workload_requests(spec, model_kwargs["vocab_size"], seed=100 * i, scale=scale,
                                                      capacity_tok_s=capacity)
            engine.reset_prefix_cache()
            t = time.perf_counter()
            run = TimedDriver(engine).run(*reqs)
            if engine.get_stats()["num_compilations"] != compiled:
                raise RuntimeError(f"{name}: the engine compiled during a timed run (a bucket the warm-up missed)")
            runs[name] = (spec, reqs, runs[name][2] + [run])
            if capacity is None:  # the first run is offline: this machine's capacity right now
                capacity = run.summary()["output_throughput"]
            print(f"measured {name:18s} (repeat {rep + 1}/{repeats}) {len(reqs[1]):3d} requests, "
                  f"{len(run.steps):4d} steps, {time.perf_counter() - t:5.1f} s, load {os.getloadavg()[0]:.1f}")

    return runs


def ttft_parts(runs) -> dict:
    """Median over requests (and runs) of TTFT's two parts, in ms: the wait from arrival to the
    first step that schedules the request (queue) and from there to its first token (service)."""
    rows = [r for run in runs for r in run.request_rows(finished_only=True)]
    queue = [r["queue_time"] for r in rows]
    service = [r["ttft"] - r["queue_time"] for r in rows]
    return {"queue": 1e3 * float(np.median(queue)), "service": 1e3 * float(np.median(service))}


def rel_err(pred: float, meas: float) -> float:
    return (pred - meas) / meas


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny model, a quarter of the requests (smoke run)")
    ap.add_argument("--no-roofline", action="store_true", help="skip the roofline micro-benchmark column")
    ap.add_argument("--repeats", type=int, default=5,
                    help="timed runs of each workload (round-robin); predictions are compared with their median")
    ap.add_argument("--huber-delta", type=float, default=1.0,
                    help="the fit's Huber loss delta, in mean step times (jaxllm.sim.fit); <= 0: squared error")
    ap.add_argument("--record", default=None, help="also pickle the measured runs here (for --from-record)")
    ap.add_argument("--from-record", default=None,
                    help="skip measuring: fit and predict on runs pickled by an earlier --record (same --quick)")
    ap.add_argument("--model-cache-dir", default=os.path.expanduser("~/.cache/jaxllm/bench_models"))
    ap.add_argument("--out", default=os.path.join(HERE, "results", "sim_accuracy.json"))
    ap.add_argument("--cost-model-out", default=os.path.join(HERE, "results", "sim_cost_model_cpu.json"))
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error(f"--repeats must be >= 1, got {args.repeats}")

    model_kwargs = QUICK_MODEL if args.quick else MODEL
    scale = 0.25 if args.quick else 1.0
    model_dir = bench_throughput.build_model(model_kwargs, args.model_cache_dir, max_position_embeddings=1024)
    max_num_seqs = 16
    # Four token buckets (not five): each compiles once, and compiling dominates a short run here.
    config = EngineConfig(model=model_dir, skip_tokenizer_init=True, token_buckets=(16, 32, 64, 128),
                          cache=CacheConfig(block_size=16, num_kv_blocks=160),
                          scheduler=SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=128,
                                                    max_model_len=512))
    engine = Engine(config)
    if args.from_record:  # fit and predict only, on runs an earlier invocation measured
        with open(args.from_record, "rb") as f:
            runs = pickle.load(f)
    else:
        runs = measure(engine, model_kwargs, scale, args.repeats)
    if args.record:
        with open(args.record, "wb") as f:
            pickle.dump(runs, f)

    model_config = model_config_from(model_dir)
    costs = ModelCosts.from_config(model_config, config.dtype)
    resolved = engine.resolved
    fit_steps = [s for spec, _, reps in runs.values() if spec[1] == "fit" for run in reps for s in run.steps]
    t = time.perf_counter()
    attention = engine.get_stats()["attention_backend"]
    fitted = fit_cost_model(fit_steps, costs, resolved.bytes_per_block, max_num_seqs, attention_backend=attention,
                            huber_delta=args.huber_delta if args.huber_delta > 0 else None,
                            meta={"machine": os.uname().nodename, "model": model_kwargs,
                                  "matmul_backend": engine.get_stats()["matmul_backend"],
                                  "fit_workloads": [s[0] for s in WORKLOADS if s[1] == "fit"]})
    print(f"fitted on {len(fit_steps)} steps in {time.perf_counter() - t:.1f} s: {fitted.describe()}")
    fitted.save(args.cost_model_out)

    roofline = None
    if not args.no_roofline:
        import roofline as roofline_mod  # experiments/roofline.py: this machine's measured peaks

        profile = HardwareProfile.from_roofline(roofline_mod.measure_roofline(reps=3), name="this CPU")
        roofline = RooflineCostModel(profile, costs)

    rows = []
    for name, (spec, reqs, reps) in runs.items():
        summaries = [run.summary() for run in reps]
        measured = {k: float(np.median([m[k] for m in summaries])) for k in KEYS}
        # The machine's own noise: how far the repeats of one workload fall from their median.
        spread = {k: max(abs(m[k] - measured[k]) for m in summaries) / measured[k] for k in KEYS}
        row = {"workload": name, "role": spec[1], "num_requests": len(reqs[1]),
               "replay_matches": all(replay(run.requests, run.steps, config, model=model_config).matches
                                     for run in reps),
               "rate": len(reqs[1]) / max(reqs[1]) if spec[5] != "offline" else math.inf,
               "measured": measured, "measured_repeats": summaries, "measured_spread": spread}
        # How fast this machine ran this workload's steps, against the fitted model: the shared
        # machine's load drifts, and a run that saw more of it has slower steps than the fit's average.
        X, targets = step_table([s for run in reps for s in run.steps], costs, resolved.bytes_per_block, max_num_seqs,
                                attention_backend=attention)
        pred = fitted.predict_table(X)
        ok = targets["device"][1]
        parts = ("host_before", "device", "host_after")
        speed = float(sum(targets[p][0][ok].sum() for p in parts) / sum(pred[p][ok].sum() for p in parts))
        row["step_time_measured_over_predicted"] = speed
        # The same ratio over steps with prompt tokens and over decode-only steps: TTFT rides on
        # the former (a request's first token comes out of a prefill step), throughput mostly on
        # the latter, so a bias in one kind shows in one metric only.
        has_prefill = np.array([s.num_prefill_tokens > 0 for run in reps for s in run.steps])
        row["step_time_measured_over_predicted_by_kind"] = {
            kind: float(sum(targets[p][0][ok & sel].sum() for p in parts) / sum(pred[p][ok & sel].sum() for p in parts))
            for kind, sel in (("prefill", has_prefill), ("decode_only", ~has_prefill)) if (ok & sel).any()}
        # Diagnostic only (not a prediction: it uses the run's own step times): the fitted model
        # scaled by that ratio, which separates the machine's drift from the scheduling model.
        drift = fitted.scaled(speed)
        for label, cm in (("fitted", fitted), ("roofline", roofline), ("drift_corrected", drift)):
            if cm is None:
                continue
            sim = SimulatedEngine(config, model_config, cm)
            predicted_run = TimedDriver(sim).run(*reqs)
            predicted = predicted_run.summary()
            row[label] = predicted
            if label == "fitted":
                row["ttft_parts_ms"] = {"measured": ttft_parts(reps), "fitted": ttft_parts([predicted_run])}
            row[f"{label}_error"] = {k: rel_err(predicted[k], measured[k])
                                     for k in KEYS}
        rows.append(row)

    print("\nrelative error of the prediction (predicted - measured) / measured; fit = used for fitting")
    print(f"{'workload':18s} {'role':4s}  {'tok/s meas':>10s} {'err':>7s}  {'TTFT mean':>9s} {'err':>7s}  "
          f"{'TTFT p90':>9s} {'err':>7s}  replay  steps meas/pred | drift-corrected TTFT mean, p90 err | "
          f"roofline tok/s err | repeats' spread")
    for r in rows:
        m, e = r["measured"], r["fitted_error"]
        roof = f"{r['roofline_error']['output_throughput']:+18.0%}" if "roofline_error" in r else ""
        print(f"{r['workload']:18s} {r['role']:4s}  {m['output_throughput']:10.1f} {e['output_throughput']:+7.1%}  "
              f"{m['mean_ttft_ms']:7.1f}ms {e['mean_ttft_ms']:+7.1%}  {m['p90_ttft_ms']:7.1f}ms "
              f"{e['p90_ttft_ms']:+7.1%}  {'same' if r['replay_matches'] else 'DIFFERS'}  "
              f"{r['step_time_measured_over_predicted']:15.2f} | {r['drift_corrected_error']['mean_ttft_ms']:+14.1%} "
              f"{r['drift_corrected_error']['p90_ttft_ms']:+7.1%}      | {roof} | "
              f"{max(r['measured_spread'].values()):5.1%}")
    print("\nwhere TTFT's error comes from: steps' measured/predicted time by kind, and TTFT's median parts (ms)")
    print(f"{'workload':18s} {'prefill':>8s} {'decode':>7s}  queue meas/pred  service meas/pred")
    for r in rows:
        kind, parts = r["step_time_measured_over_predicted_by_kind"], r["ttft_parts_ms"]
        m, f = parts["measured"], parts["fitted"]
        print(f"{r['workload']:18s} {kind.get('prefill', math.nan):8.2f} {kind.get('decode_only', math.nan):7.2f}  "
              f"{m['queue']:6.1f} / {f['queue']:6.1f}  {m['service']:7.1f} / {f['service']:6.1f}")
    held_out = [r for r in rows if r["role"] == "eval"]
    worst = max(abs(v) for r in held_out for v in r["fitted_error"].values())
    print(f"worst held-out error: {worst:.1%}")
    result = {"rows": rows, "worst_held_out_error": worst, "cost_model": json.loads(fitted.to_json()),
              "roofline_profile (a model, not a measurement)": roofline.describe() if roofline else None,
              "load_average": os.getloadavg(), "quick": args.quick}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2, default=str)
    return result


if __name__ == "__main__":
    main()
