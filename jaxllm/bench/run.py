"""One benchmark run: roofline, model, workload, arrivals, every system, summaries, ratios,
results on disk (host only; jax comes in through the jaxllm system and the roofline).

    from jaxllm.bench import BenchConfig, run_benchmark
    run = run_benchmark(BenchConfig(systems=("jaxllm", "hf_static")))
    run.summary["systems"]["jaxllm"]["output_throughput"], run.requests, run.steps  # DataFrames

A system that fails or can't run this workload is recorded (error / skipped) and the others go
on. Ratios are against the peers measured in the same run, and the jaxllm steps' roofline
fraction against the peaks measured at its start.
"""

from __future__ import annotations

import os
import time
import traceback

import numpy as np
import pandas as pd

from jaxllm.bench import arrivals as arrivals_mod
from jaxllm.bench import metrics, results
from jaxllm.bench.models import hf_config, resolve_model
from jaxllm.bench.roofline import QUICK, ModelCost, measure_roofline, roofline_fraction, roofline_time
from jaxllm.bench.systems import SystemUnavailable, get_system
from jaxllm.bench.workloads import make_workload


def _tokenizer(model_dir: str):
    """The model's tokenizer for text datasets, None when it has none (random models)."""
    if not os.path.isdir(model_dir):
        return None  # an alias or a GGUF file: words become ids
    try:
        import transformers

        tok = transformers.AutoTokenizer.from_pretrained(model_dir)
        return lambda text: tok(text, add_special_tokens=False).input_ids
    except Exception:  # noqa: BLE001 - no tokenizer files: words become ids (workloads._word_ids)
        return None


def slos(cfg) -> dict:
    return {k: v for k, v in (("ttft", cfg.slo_ttft_ms), ("tpot", cfg.slo_tpot_ms), ("e2el", cfg.slo_e2e_ms))
            if v is not None}


def run_benchmark(cfg, log=print, roofline: dict | None = None, model_dir: str | None = None) -> results.Run:
    """Run every system of `cfg` on its workload; write and return the run (results.Run).
    `roofline`: peaks measured earlier (a sweep measures once); `model_dir`: already resolved."""
    t_start = time.perf_counter()
    wcfg = cfg.workload
    if wcfg.dataset_name == "random" or wcfg.dataset_name == "shared-prefix":
        from jaxllm.bench.workloads import LengthDist

        longest = LengthDist.parse(wcfg.input_len).max_len + LengthDist.parse(wcfg.output_len).max_len + (
            wcfg.prefix_len if wcfg.dataset_name == "shared-prefix" else 0)
    else:
        longest = 2048
    model_dir = model_dir or resolve_model(cfg.model, cfg.model_cache_dir, max_model_len=longest)
    hf = hf_config(model_dir)
    vocab = hf.vocab_size if hf is not None else 32000
    tokenize = _tokenizer(model_dir) if wcfg.dataset_name == "sharegpt" else None
    workload = make_workload(wcfg, vocab, tokenize, max_model_len=cfg.engine.max_model_len)
    arrivals = arrivals_mod.for_workload(wcfg, workload)

    if roofline is None and cfg.measure_roofline:
        log("measuring roofline ...")
        roofline = measure_roofline(**(QUICK if cfg.roofline_size == "quick" else {}))
        log(f"  matmul {roofline['matmul_flops'] / 1e9:.1f} GFLOP/s, read {roofline['read_bandwidth'] / 1e9:.1f} GB/s")
    path = results.run_dir(cfg)
    os.makedirs(path, exist_ok=True)
    env = results.environment()
    results.write_json(os.path.join(path, "config.json"),
                       {"config": cfg.to_dict(), "config_hash": cfg.config_hash(), "model_dir": model_dir, **env})
    wsum = workload.summary()
    log(f"workload: {workload.num_requests} requests ({wsum['dataset_name']}), prompts mean "
        f"{wsum['prompt_len']['mean']:.0f} max {wsum['prompt_len']['max']}, outputs mean "
        f"{wsum['output_len']['mean']:.0f} max {wsum['output_len']['max']}, rate {wcfg.request_rate} req/s")

    per_system, req_tables, step_tables = {}, [], []
    cost = ModelCost.from_hf_config(hf, 4 if cfg.engine.dtype == "float32" else 2) if hf is not None else None
    for name in cfg.systems:
        log(f"{name} ...")
        try:
            res = get_system(name)(model_dir, workload, arrivals, cfg)
        except SystemUnavailable as e:
            per_system[name] = {"skipped": str(e)}
            log(f"  skipped: {e}")
            continue
        except Exception as e:  # noqa: BLE001 - one system failing must not lose the others
            per_system[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(limit=8)}
            log(f"  failed: {type(e).__name__}: {e}")
            continue
        s = metrics.summarize(res.requests, res.steps, res.duration, slos(cfg),
                              block_size=cfg.engine.block_size if res.steps is not None else None)
        s["info"] = res.info
        s["kind"] = res.kind
        if res.kind == "predicted":
            s["prediction"] = f"predicted by the simulator's cost model {res.info.get('cost_model')!r}: a model, not a measurement"
        if res.steps is not None and cost is not None and roofline is not None:
            s["roofline"] = roofline_fraction(res.steps, res.duration, cost, roofline)
        if "preemption_cost" in res.info:
            s.update(preemption_summary(res.info["preemption_cost"], cost, roofline))
        per_system[name] = s
        req_tables.append(res.requests.assign(system=name))
        if res.steps is not None:
            step_tables.append(res.steps.assign(system=name))
        log(f"  {s['output_throughput']:.1f} output tok/s, {s['request_throughput']:.2f} req/s"
            + (" (predicted: a model, not a measurement)" if res.kind == "predicted" else "")
            + (f", p90 TTFT {s['p90_ttft_ms']:.0f} ms" if s.get("p90_ttft_ms") is not None else ""))

    requests = pd.concat(req_tables, ignore_index=True) if req_tables else pd.DataFrame()
    steps = pd.concat(step_tables, ignore_index=True) if step_tables else pd.DataFrame()
    requests.to_csv(os.path.join(path, "requests.csv"), index=False)
    steps.to_csv(os.path.join(path, "steps.csv"), index=False)
    ok = [n for n, s in per_system.items() if "output_throughput" in s]
    summ = {
        "status": "ok" if ok else "failed",
        "error": None if ok else "; ".join(f"{n}: {s.get('error') or s.get('skipped')}" for n, s in per_system.items()),
        "config_hash": cfg.config_hash(),
        "workload": wsum,
        "roofline": roofline,
        "systems": per_system,
        "ratios": metrics.ratios(per_system),
        "total_bench_time_s": time.perf_counter() - t_start,
    }
    results.write_json(os.path.join(path, "summary.json"), summ)
    run = results.Run(path, cfg.to_dict(), requests, steps, summ)
    log(report(run))
    return run


def preemption_summary(pc: dict, cost: ModelCost | None, roofline: dict | None) -> dict:
    """Flat summary fields of bench/preemption.py's costs (sweep rows read them), with the
    recompute step's roofline fraction (its roofline time / measured) and the swap copies'
    fraction of the measured copy bandwidth, when the peaks were measured."""
    out = {"preemption_victim_tokens": pc["victim_tokens"], "preemption_recompute_ms": pc["recompute_ms"],
           "preemption_swap_ms": pc["swap_ms"], "preemption_swap_over_recompute": pc["swap_over_recompute"]}
    if roofline is not None and cost is not None:
        n = np.array([pc["victim_tokens"]])
        out["preemption_recompute_roofline_fraction"] = (
            roofline_time(*cost.step_cost(n, n, 1), roofline) / (pc["recompute_ms"] / 1e3))
        out["preemption_swap_copy_bw_fraction"] = (
            None if pc["swap_ms"] is None else pc["swap_bytes_copied"] / (pc["swap_ms"] / 1e3) / roofline["copy_bandwidth"])
    return out


def _label(name: str, summary: dict) -> str:
    """A system's name in the printed tables; a prediction is starred (see report's footnote)."""
    return name + "*" if summary.get("kind") == "predicted" else name


def latency_table(run: results.Run) -> str:
    """TTFT / TPOT / ITL / e2e latency percentiles (ms) of every system that reports them."""
    rows = []
    for name, x in run.summary["systems"].items():
        for k in ("ttft", "tpot", "itl", "e2el"):
            if x.get(f"mean_{k}_ms") is not None:
                rows.append(f"  {_label(name, x):14s} {k:5s} " + " ".join(
                    f"{p} {x[f'{p}_{k}_ms']:9.1f}" for p in ("mean", "median", "p90", "p99")))
    return "\n".join(["latency (ms):"] + rows)


def report(run: results.Run) -> str:
    """The human summary: each system's throughput and latency, ratios against the peers of the
    same run, the roofline fraction."""
    s = run.summary
    lines = [f"=== {run.path} ==="]
    for name, x in s["systems"].items():
        if "output_throughput" not in x:
            lines.append(f"  {name:14s} {'skipped: ' + x['skipped'] if 'skipped' in x else 'FAILED: ' + x['error']}")
            continue
        lat = "".join(f"  {k} p50/p90/p99 {x[f'median_{k}_ms']:.0f}/{x[f'p90_{k}_ms']:.0f}/{x[f'p99_{k}_ms']:.0f} ms"
                      for k in ("ttft", "tpot") if x.get(f"median_{k}_ms") is not None)
        lines.append(f"  {_label(name, x):14s} {x['output_throughput']:9.1f} out tok/s {x['request_throughput']:7.3f} req/s "
                     f"{x['duration_s']:7.2f} s{lat}")
        if x.get("goodput") is not None:
            lines.append(f"  {'':14s} goodput {x['goodput']:.3f} req/s under {x['slos_ms']}")
    if any(x.get("kind") == "predicted" for x in s["systems"].values()):
        lines.append("  * predicted: the simulator's cost model, a model, not a measurement")
    for k, v in s["ratios"].items():
        lines.append(f"  {k}: " + ", ".join(f"{m} {r:.2f}x" for m, r in v.items()))
    j = s["systems"].get("jaxllm", {})
    if "roofline" in j and j["roofline"]:
        rf = j["roofline"]
        lines.append(f"  jaxllm roofline: {rf['fraction_of_roofline']:.1%} of the per-step roofline, "
                     f"{rf['flops_frac_of_peak']:.1%} of matmul peak (peaks measured at the start of this run)")
    if "kv_usage_mean" in j:
        lines.append(f"  jaxllm KV: usage mean {j['kv_usage_mean']:.1%} max {j['kv_usage_max']:.1%}, "
                     f"token fill {j.get('kv_token_fill', float('nan')):.1%}, preemptions {j['num_preemptions']}, "
                     f"compile during run {j['compile_time_during_run_s']:.2f} s (warm-up {j['info']['warmup_s']:.1f} s apart)")
    return "\n".join(lines)
