"""Benchmark metrics as vLLM's `bench serve` reports them, from per-request and per-step tables
(pandas; host only, never imports jax).

    requests = request_table(rows)            # one row per request (times in seconds)
    steps = step_table(step_stats)            # one row per engine step (StepStats fields)
    summary = summarize(requests, steps, duration, slos={"ttft": 500, "tpot": 50})

Definitions (times in the tables are seconds; the summary reports latencies in ms, as vLLM):
  ttft   first token time - arrival time
  tpot   (last token time - first token time) / (output tokens - 1), requests with >= 2 tokens
  itl    every gap between consecutive output tokens, pooled over all requests
  e2el   finish time - arrival time
  mean / median (p50) / p90 / p99 of each: numpy's linear-interpolated percentiles.
  request_throughput = completed / duration; input / output / total token throughput likewise.
  goodput = requests meeting every stated SLO (ttft, tpot, e2el in ms) / duration.
Compile time is summed from the steps' compile_time (0 after a complete warm-up) and reported
apart; throughput is measured over the run's wall time either way.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math

import numpy as np
import pandas as pd

PERCENTILES = (50, 90, 99)
REQUEST_COLUMNS = ("request_id", "arrival_time", "first_scheduled_time", "first_token_time", "finished_time",
                   "prompt_len", "output_len", "num_output_tokens", "num_preemptions", "num_cached_tokens",
                   "ttft", "tpot", "e2el", "queue_time", "itl", "output_digest", "error")


def token_digest(token_ids) -> str | None:
    """12 hex digits naming a request's output tokens ([[ids] per completion]): runs that must
    produce the same tokens (policies, preemption modes) can be compared without storing them."""
    if token_ids is None:
        return None
    return hashlib.sha1(json.dumps([list(map(int, t)) for t in token_ids]).encode()).hexdigest()[:12]


def request_row(request_id: str, prompt_len: int, output_len: int, metrics=None, num_output_tokens=None,
                arrival_time: float | None = None, error: str | None = None, origin: float = 0.0,
                token_ids=None) -> dict:
    """One row of the request table from a RequestMetrics (times made relative to `origin`).
    token_ids: the completions' output tokens, kept as a digest (token_digest)."""
    m = metrics

    def rel(t):
        return None if t is None else t - origin

    if m is None:
        return dict(request_id=request_id, arrival_time=rel(arrival_time), first_scheduled_time=None,
                    first_token_time=None, finished_time=None, prompt_len=prompt_len, output_len=output_len,
                    num_output_tokens=num_output_tokens or 0, num_preemptions=0, num_cached_tokens=0,
                    ttft=None, tpot=None, e2el=None, queue_time=None, itl="[]",
                    output_digest=token_digest(token_ids), error=error)
    return dict(
        request_id=request_id, arrival_time=rel(m.arrival_time), first_scheduled_time=rel(m.first_scheduled_time),
        first_token_time=rel(m.first_token_time), finished_time=rel(m.finished_time),
        prompt_len=prompt_len, output_len=output_len,
        num_output_tokens=m.num_output_tokens if num_output_tokens is None else num_output_tokens,
        num_preemptions=m.num_preemptions, num_cached_tokens=m.num_cached_tokens,
        ttft=m.ttft, tpot=m.mean_tpot, e2el=m.e2e_latency, queue_time=m.queue_time,
        # A JSON list: the table stays flat (CSV) and the gaps are all there.
        itl=json.dumps([round(x, 9) for x in m.inter_token_latencies]), output_digest=token_digest(token_ids),
        error=error,
    )


def request_table(rows: list[dict]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=list(REQUEST_COLUMNS))


def record_dict(record) -> dict:
    """A StepStats (or a dict) as a flat dict of its fields. Not dataclasses.asdict: that deep-
    copies every tuple of the `scheduled` column, which cost more than simulating the steps."""
    if not dataclasses.is_dataclass(record):
        return dict(record)
    return {name: getattr(record, name) for name in _field_names(type(record))}


@functools.lru_cache(maxsize=None)
def _field_names(cls) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


def step_table(stats, origin: float = 0.0) -> pd.DataFrame:
    """StepStats records as a DataFrame; times relative to `origin`; tuples as JSON strings."""
    rows = []
    for s in stats:
        d = record_dict(s)
        for k in ("start_time", "time", "end_time"):
            d[k] -= origin
        for k in ("scheduled", "preempted", "row_num_computed_tokens"):
            d[k] = json.dumps([list(x) if isinstance(x, tuple) else x for x in d.get(k, ())])
        rows.append(d)
    return pd.DataFrame(rows)


def itl_values(requests: pd.DataFrame) -> np.ndarray:
    """All inter-token gaps of all requests (seconds), pooled."""
    out = [x for s in requests["itl"] if isinstance(s, str) for x in json.loads(s)]
    return np.asarray(out, np.float64)


def _stats_ms(values, name: str) -> dict:
    v = np.asarray([x for x in values if x is not None and not (isinstance(x, float) and math.isnan(x))],
                   np.float64) * 1e3
    if v.size == 0:
        return {f"mean_{name}_ms": None, f"median_{name}_ms": None,
                **{f"p{p}_{name}_ms": None for p in PERCENTILES}}
    return {f"mean_{name}_ms": float(v.mean()), f"median_{name}_ms": float(np.median(v)),
            **{f"p{p}_{name}_ms": float(np.percentile(v, p)) for p in PERCENTILES}}


SLO_KEYS = ("ttft", "tpot", "e2el")


def check_slos(slos: dict) -> None:
    for k, v in slos.items():
        if k not in SLO_KEYS:
            raise ValueError(f"unknown SLO {k!r}; choose from {SLO_KEYS}")
        if not (isinstance(v, (int, float)) and v > 0):
            raise ValueError(f"SLO {k} must be > 0 ms, got {v!r}")


def good_requests(requests: pd.DataFrame, slos: dict[str, float]) -> pd.Series:
    """Boolean per request: finished without error and within every SLO (ms; keys ttft / tpot /
    e2el). A request with one output token has no TPOT and meets any TPOT SLO (as vLLM)."""
    check_slos(slos)
    ok = requests["error"].isna() & requests["e2el"].notna()
    for k, limit in slos.items():
        col = requests[k].astype(float) * 1e3
        ok &= col.isna() | (col <= limit) if k == "tpot" else (col <= limit)
    return ok


def summarize(requests: pd.DataFrame, steps: pd.DataFrame | None, duration: float,
              slos: dict[str, float] | None = None, block_size: int | None = None) -> dict:
    """The run's summary (see the module docstring); `duration` in seconds."""
    if not duration > 0:
        raise ValueError(f"duration must be > 0 s, got {duration!r}")
    check_slos(slos or {})
    done = requests[requests["error"].isna() & requests["e2el"].notna()]
    out = {
        "completed": int(len(done)),
        "failed": int(len(requests) - len(done)),
        "duration_s": float(duration),
        "total_input_tokens": int(done["prompt_len"].sum()),
        "total_output_tokens": int(done["num_output_tokens"].sum()),
    }
    out["request_throughput"] = out["completed"] / duration
    out["input_throughput"] = out["total_input_tokens"] / duration
    out["output_throughput"] = out["total_output_tokens"] / duration
    out["total_token_throughput"] = (out["total_input_tokens"] + out["total_output_tokens"]) / duration
    for name in ("ttft", "tpot", "e2el"):
        out.update(_stats_ms(done[name].tolist(), name))
    out.update(_stats_ms(itl_values(done).tolist(), "itl"))
    if slos:
        out["slos_ms"] = dict(slos)
        # A system that reports no TTFT (a static generate) has no goodput under a TTFT SLO.
        unknown = [k for k in slos if len(done) and done[k].isna().all() and k != "tpot"]
        out["goodput"] = None if unknown else int(good_requests(requests, slos).sum()) / duration
    out["num_preemptions"] = int(requests["num_preemptions"].fillna(0).sum())
    if steps is not None and len(steps):
        out.update(step_summary(steps, block_size))
    return out


def step_summary(steps: pd.DataFrame, block_size: int | None = None) -> dict:
    """KV usage, batch composition, preemptions by mode, where the step time went, compile time."""
    usage = steps["kv_blocks_used"] / steps["num_kv_blocks"]
    peak = int(np.argmax(steps["kv_blocks_referenced"].to_numpy()))
    step_time = (steps["end_time"] - steps["start_time"]).sum()
    out = {
        "num_steps": int(len(steps)),
        "kv_usage_mean": float(usage.mean()),
        "kv_usage_max": float(usage.max()),
        "mean_batch_requests": float(steps["num_scheduled_requests"].mean()),
        "mean_batch_tokens": float(steps["num_batched_tokens"].mean()),
        "prefill_token_frac": float(steps["num_prefill_tokens"].sum() / max(steps["num_batched_tokens"].sum(), 1)),
        "token_padding_frac": float(1 - steps["num_batched_tokens"].sum() / max(steps["num_padded_tokens"].sum(), 1)),
        "num_preempted_recompute": int(steps["num_preempted_recompute"].sum()),
        "num_preempted_swap": int(steps["num_preempted_swap"].sum()),
        "device_time_s": float(steps["device_time"].sum()),
        "host_time_s": float(steps["host_time"].sum()),
        "step_time_s": float(step_time),
        "compile_time_during_run_s": float(steps["compile_time"].sum()),
        "prefix_cache_hit_rate": float(steps["prefix_cache_hits"].sum() / max(steps["prefix_cache_queries"].sum(), 1)),
        # The PagedAttention paper's sharing saving: 1 - blocks held / blocks referenced.
        "kv_sharing_saving": float(1 - steps["kv_blocks_used"].sum() / max(steps["kv_blocks_referenced"].sum(), 1)),
        # ... at the step referencing the most blocks (the memory a run needs is its peak).
        "kv_sharing_saving_at_peak": float(1 - steps["kv_blocks_used"].iloc[peak]
                                           / max(steps["kv_blocks_referenced"].iloc[peak], 1)),
        "kv_blocks_used_max": int(steps["kv_blocks_used"].max()),
        "kv_blocks_used_mean": float(steps["kv_blocks_used"].mean()),
        # Prompt tokens the steps computed (a prefix-cache hit skips them; a recompute-preempted
        # request computes its tokens again).
        "total_prefill_tokens": int(steps["num_prefill_tokens"].sum()),
        "num_blocks_swapped_out": int(steps["num_blocks_swapped_out"].sum()),
        "num_blocks_swapped_in": int(steps["num_blocks_swapped_in"].sum()),
    }
    if block_size:
        # Tokens whose K/V the batch attends to / slots of the blocks its requests reference:
        # how much of the memory paging hands out holds real tokens (the paper's Fig. 2).
        out["kv_token_fill"] = float(steps["num_context_tokens"].sum()
                                     / max((steps["kv_blocks_referenced"] * block_size).sum(), 1))
    return out


def ratios(summaries: dict[str, dict], base: str = "jaxllm",
           keys=("output_throughput", "request_throughput")) -> dict:
    """{f"{base}_vs_{peer}": {key: base / peer}} for every other system that has the keys."""
    out = {}
    b = summaries.get(base)
    if not b or "output_throughput" not in b:
        return out
    for name, s in summaries.items():
        if name == base or "output_throughput" not in s:  # skipped or failed peers give no ratio
            continue
        out[f"{base}_vs_{name}"] = {k: b[k] / s[k] for k in keys if s.get(k) and b.get(k) is not None}
    return out
