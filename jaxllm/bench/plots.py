"""Plots of benchmark tables (matplotlib; each function returns its Figure).

    throughput_vs_rate(sweep_table, hue="scheduling_policy")
    latency_vs_throughput(sweep_table, latency="p90_ttft_ms", hue="scheduling_policy")
    latency_cdf(run.requests, "ttft")                     # one curve per system
    kv_usage_over_time(run.steps); batch_composition(run.steps)
    sweep_curve(table, x="block_size", y="output_throughput")

The caller picks the backend (scripts and the CLI use Agg; notebooks their inline one).
"""

from __future__ import annotations

import numpy as np

from jaxllm.bench.metrics import itl_values


def _axes(ax=None, figsize=(6, 3.5)):
    import matplotlib.pyplot as plt

    if ax is not None:
        return ax.figure, ax
    return plt.subplots(figsize=figsize)


def _finish(fig, ax, xlabel: str, ylabel: str, legend_title: str | None = None, legend: bool = True):
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if legend:
        ax.legend(title=legend_title, fontsize="small")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def sweep_curve(table, x: str, y: str, hue: str | None = None, ax=None, marker="o", logx: bool = False):
    """y against x over a sweep table's successful rows, one line per value of `hue`."""
    fig, ax = _axes(ax)
    ok = table[table["status"] == "ok"] if "status" in table else table
    groups = ok.groupby(hue, sort=False) if hue else [(None, ok)]
    for key, g in groups:
        g = g.sort_values(x)
        ax.plot(g[x], g[y], marker=marker, label=None if key is None else str(key))
    if logx:
        ax.set_xscale("log")
    return _finish(fig, ax, x, y, hue, legend=bool(hue))


def throughput_vs_rate(table, y: str = "output_throughput", hue: str | None = None, ax=None):
    return sweep_curve(table, "request_rate", y, hue, ax)


def latency_vs_throughput(table, latency: str = "p90_ttft_ms", throughput: str = "request_throughput",
                          hue: str | None = None, ax=None):
    """Latency under load: each point one request rate (the curve turns up where the system saturates)."""
    fig, ax = _axes(ax)
    ok = table[table["status"] == "ok"] if "status" in table else table
    for key, g in (ok.groupby(hue, sort=False) if hue else [(None, ok)]):
        g = g.sort_values(throughput)
        ax.plot(g[throughput], g[latency], marker="o", label=None if key is None else str(key))
    return _finish(fig, ax, throughput, latency, hue, legend=bool(hue))


def latency_cdf(requests, metric: str = "ttft", by: str | None = "system", ax=None):
    """Empirical CDF of a per-request latency (ttft / tpot / e2el seconds, or "itl": all gaps), in ms."""
    fig, ax = _axes(ax)
    groups = requests.groupby(by, sort=False) if by and by in requests else [(None, requests)]
    for key, g in groups:
        v = itl_values(g) if metric == "itl" else g[metric].dropna().to_numpy(np.float64)
        if not len(v):
            continue
        v = np.sort(v) * 1e3
        ax.step(v, np.arange(1, len(v) + 1) / len(v), where="post", label=None if key is None else str(key))
    return _finish(fig, ax, f"{metric} (ms)", "fraction of requests" if metric != "itl" else "fraction of gaps",
                   legend=bool(by and by in requests))


def kv_usage_over_time(steps, ax=None):
    """KV blocks held (and referenced, counting shared blocks once per holder) over the run."""
    fig, ax = _axes(ax)
    for key, g in (steps.groupby("system", sort=False) if "system" in steps else [(None, steps)]):
        sfx = "" if key is None else f" ({key})"
        ax.plot(g["time"], g["kv_blocks_used"] / g["num_kv_blocks"], label="used" + sfx)
        ax.plot(g["time"], g["kv_blocks_referenced"] / g["num_kv_blocks"], ls="--", label="referenced" + sfx)
    return _finish(fig, ax, "time (s)", "fraction of KV blocks")


def batch_composition(steps, ax=None):
    """Prefill and decode tokens of each step, stacked, with the token bucket it ran in."""
    fig, ax = _axes(ax)
    t = steps["step"].to_numpy()
    ax.fill_between(t, 0, steps["num_decode_tokens"], step="post", label="decode tokens", alpha=0.7)
    ax.fill_between(t, steps["num_decode_tokens"], steps["num_batched_tokens"], step="post",
                    label="prefill tokens", alpha=0.7)
    ax.step(t, steps["num_padded_tokens"], where="post", color="k", lw=0.8, label="bucket")
    return _finish(fig, ax, "step", "tokens")


def save_run_plots(run, directory: str | None = None) -> list[str]:
    """Latency CDFs, KV usage and batch composition of a run as PNGs in its directory."""
    import os

    import matplotlib.pyplot as plt

    directory = directory or run.path
    paths = []
    figs = {}
    if len(run.requests):
        for m in ("ttft", "e2el"):
            if run.requests[m].notna().any():
                figs[f"cdf_{m}.png"] = latency_cdf(run.requests, m)
    if len(run.steps):
        first = run.steps[run.steps["system"] == run.steps["system"].iloc[0]]
        figs["kv_usage.png"] = kv_usage_over_time(first)
        figs["batch_composition.png"] = batch_composition(first)
    for name, fig in figs.items():
        p = os.path.join(directory, name)
        fig.savefig(p, dpi=100)
        plt.close(fig)
        paths.append(p)
    return paths
