"""Sweeps: one benchmark run per point of a grid over any config fields, one summary row each.

    table = sweep(base, {"block_size": [8, 16, 32], "request_rate": [1.0, 4.0]})   # 6 runs

Every field is checked and every point's config built before anything runs, so a typo'd field
or a bad value (a rate <= 0) fails at once. Each run writes its own directory (results.py);
a point whose directory already holds a complete run is not run again (resume after a crash or
Ctrl-C by running the same sweep). A run that raises is recorded as failed with its error, and
the sweep goes on. The table (one row per point and system, e.g. jaxllm measured beside the
simulator's prediction: column `kind` is "measured" or "predicted") is also written as
sweep_<hash>.csv.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import traceback

import pandas as pd

from jaxllm.bench import results
from jaxllm.bench.config import field_path

ROW_METRICS = ("completed", "failed", "output_throughput", "request_throughput", "total_token_throughput", "goodput",
               "mean_ttft_ms", "median_ttft_ms", "p90_ttft_ms", "p99_ttft_ms",
               "mean_tpot_ms", "p90_tpot_ms", "mean_itl_ms", "p90_itl_ms", "mean_e2el_ms", "p90_e2el_ms",
               "num_preemptions", "kv_usage_mean", "kv_usage_max", "kv_token_fill", "kv_sharing_saving",
               "kv_sharing_saving_at_peak", "kv_blocks_used_max", "total_prefill_tokens", "num_preempted_swap",
               "num_blocks_swapped_out", "preemption_recompute_ms", "preemption_swap_ms",
               "preemption_swap_over_recompute", "prefix_cache_hit_rate", "mean_batch_requests", "num_steps", "compile_time_during_run_s")


def grid(axes: dict[str, list]) -> list[dict]:
    """Every combination of the axes' values, in order (the last axis varies fastest)."""
    for name, values in axes.items():
        field_path(name)  # raises naming an unknown field
        if not isinstance(values, (list, tuple)) or not values:
            raise ValueError(f"sweep axis {name!r} needs a non-empty list of values, got {values!r}")
    names = list(axes)
    return [dict(zip(names, combo)) for combo in itertools.product(*(axes[n] for n in names))]


def _label(v):
    """A sweep value for the table (a policy object as its class name)."""
    return v if isinstance(v, (str, int, float, bool, type(None))) else type(v).__name__


def summary_row(point: dict, summary: dict | None, path: str, system: str) -> dict:
    row = {k: _label(v) for k, v in point.items()}
    s = ((summary or {}).get("systems") or {}).get(system) or {}
    row.update(system=system, kind=s.get("kind", "predicted" if system == "sim" else "measured"),
               run_dir=path, status=(summary or {}).get("status", "failed"),
               error=(summary or {}).get("error") or s.get("error") or s.get("skipped"))
    for k in ROW_METRICS:
        row[k] = s.get(k)
    rf = s.get("roofline") or {}
    row["fraction_of_roofline"] = rf.get("fraction_of_roofline")
    for peer, r in ((summary or {}).get("ratios") or {}).items():
        row[f"{peer}_output_throughput"] = r.get("output_throughput")
    return row


def sweep(base, axes: dict[str, list], log=print, run_fn=None, system: str | None = None) -> pd.DataFrame:
    """Run `base` at every grid point of `axes` (field -> values); returns one row per point and
    system: the point's values, system / kind / status / error / run_dir, and that system's
    summary metrics (`system`: only that one; default every system of the config). `run_fn(cfg, roofline=..., log=...)`: the runner (default run.run_benchmark)."""
    from jaxllm.bench.run import run_benchmark

    run_fn = run_fn or run_benchmark
    points = grid(axes)
    configs = [base.replace(**p) for p in points]  # every bad value fails here, before any run
    systems = [system] if system else list(base.systems)
    roofline = None
    rows = []
    for i, (point, cfg) in enumerate(zip(points, configs)):
        path = results.run_dir(cfg)
        if results.is_complete(path):
            log(f"[{i + 1}/{len(points)}] {point}: done already ({path})")
            rows += [summary_row(point, results.read_summary(path), path, name) for name in systems]
            continue
        log(f"[{i + 1}/{len(points)}] {point}")
        if roofline is None and cfg.measure_roofline:
            from jaxllm.bench.roofline import QUICK, measure_roofline

            roofline = measure_roofline(**(QUICK if cfg.roofline_size == "quick" else {}))
        try:
            summary = run_fn(cfg, roofline=roofline, log=log).summary
        except Exception as e:  # noqa: BLE001 - a failed point is recorded; the sweep goes on
            summary = {"status": "failed", "error": f"{type(e).__name__}: {e}",
                       "traceback": traceback.format_exc(limit=8), "config": cfg.to_dict()}
            os.makedirs(path, exist_ok=True)
            results.write_json(os.path.join(path, "summary.json"), summary)
            log(f"  failed: {summary['error']}")
        rows += [summary_row(point, summary, path, name) for name in systems]
    table = pd.DataFrame(rows)
    key = json.dumps({"base": base.config_hash(), "axes": {k: [_label(v) for v in vs] for k, vs in axes.items()}},
                     sort_keys=True)
    out = os.path.join(os.path.expanduser(base.output_dir), f"sweep_{hashlib.sha1(key.encode()).hexdigest()[:12]}.csv")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    table.to_csv(out, index=False)
    table.attrs["path"] = out
    return table
