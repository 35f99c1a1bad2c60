"""Memory sharing in the paged KV cache, measured against no sharing in the same run: a thin
script over jaxllm.bench's sweeps of experiments/configs/sharing_{parallel,beam,prefix}.toml.

    python experiments/bench_sharing.py [--quick] [--skip-hf] [--out experiments/results/bench_sharing.json]

Each config sweeps its sharing knob (n, beam_width, prefix_len) with the prefix cache on
(sharing) and off (nothing shared: what the same requests hold without it):

  parallel   n = 2, 4, 6 samples of each prompt. The memory saving is the paper's: over the
             steps, 1 - blocks held / blocks the same requests reference (a shared block counted
             once per holder; summary kv_sharing_saving), also at the step referencing the most
             (kv_sharing_saving_at_peak); plus output tokens/s. transformers'
             generate(num_return_sequences=n) is the peer (system hf_static).
  beam       beam widths 2, 4, 6 (LLM.beam_search): the same saving, time against no sharing,
             the best beams must match; transformers' generate(num_beams=k) is the peer.
             With the cache off a beam cannot find its parent's blocks, so every beam step
             prefills its whole sequence again: that run is ~4x slower and holds FEWER blocks at
             its peak (width 2 here: 46 blocks against 113, 7.5x the prompt tokens computed,
             126 steps against 26), because the token budget admits only
             a few of those long prefills per step and each request lives for one step. Its
             peak is not the "no sharing" memory; the saving is read from the sharing run's
             own holders (blocks held against blocks referenced), as for parallel sampling.
  prefix     requests sharing a 1-shot and a 5-shot prefix: throughput with the cache on and
             off, the hit rate and the prompt tokens computed.

The PagedAttention paper (OPT-13B) reports parallel sampling saving 6.1-9.8% (Alpaca) and
16.2-30.5% (ShareGPT) of KV memory, beam search 37.6-55.2% and 44.3-66.3%, and 1.67x / 3.58x
throughput over Orca for 1-shot / 5-shot shared prefixes. The JSON keeps the keys of this
script's earlier version (parallel / beam / prefix -> shared / independent / hf, cache_on /
cache_off / speedup); each entry also names its run directory.
"""

from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from jaxllm.bench import load_run, load_toml, sweep  # noqa: E402
from jaxllm.bench.models import SHAPES  # noqa: E402
from jaxllm.bench.results import read_summary, write_json  # noqa: E402
from jaxllm.bench.run import run_benchmark  # noqa: E402

CONFIGS = os.path.join(ROOT, "experiments", "configs")
# --quick: the tiny model, 4 requests (8 sharing a prefix), n / width 2 only, short outputs.
QUICK = dict(model="random:tiny", num_prompts=4, max_num_batched_tokens=128, max_model_len=320)
QUICK_SAMPLES = dict(input_len="lognormal:16:0.5:4:40", output_len="fixed:8")  # parallel and beam


def _run(summary: dict, system: str = "jaxllm") -> dict:
    """The earlier JSON's per-run fields from a run's summary."""
    s = summary["systems"][system]
    out = {"elapsed_s": s["duration_s"], "tok_per_s": s["output_throughput"], "output_tokens": s["total_output_tokens"]}
    if "num_steps" in s:
        out.update(peak_blocks=s["kv_blocks_used_max"], mean_blocks=s["kv_blocks_used_mean"], steps=s["num_steps"],
                   saving=s["kv_sharing_saving"], saving_at_peak=s["kv_sharing_saving_at_peak"],
                   preemptions=s["num_preemptions"], hit_rate=s["prefix_cache_hit_rate"],
                   prompt_tokens_computed=s["total_prefill_tokens"],
                   weight_read_roofline=(s.get("roofline") or {}).get("fraction_of_roofline"))
    return out


def _sweep(name: str, overrides: dict, axis: str, values: list, roof, systems=("jaxllm",)):
    base, axes = load_toml(os.path.join(CONFIGS, f"sharing_{name}.toml"))
    base = base.replace(systems=list(systems), measure_roofline=False, **overrides)
    axes = {axis: values, **{k: v for k, v in axes.items() if k != axis}} if systems == ("jaxllm",) else {axis: values}
    return sweep(base, axes, log=lambda *a: None,
                 run_fn=lambda cfg, roofline=None, log=print: run_benchmark(cfg, roofline=roof, log=log))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny model, 4 requests, n/width 2 only, short outputs")
    parser.add_argument("--num-requests", type=int, default=None, help="default 16 (4 with --quick)")
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--runs-dir", default=None, help="the harness's run directories (default: the configs')")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    from jaxllm.bench.roofline import QUICK as QUICK_ROOF, measure_roofline

    over = dict(QUICK) if args.quick else {}
    roof = measure_roofline(**(QUICK_ROOF if args.quick else {}))
    if args.num_requests:
        over["num_prompts"] = args.num_requests
    if args.runs_dir:
        over["output_dir"] = args.runs_dir
    n_req = over.get("num_prompts", 16)
    widths = [2] if args.quick else [2, 4, 6]
    print(f"roofline: {roof['matmul_flops'] / 1e9:.0f} GFLOP/s matmul, {roof['read_bandwidth'] / 1e9:.1f} GB/s read")
    model = over.get("model", "random:small")
    shape = SHAPES.get(model.split(":", 1)[1]) if model.startswith("random:") else None
    report = {"roofline": roof, "model": shape or model, "num_requests": n_req, "block_size": 16,
              "parallel": {}, "beam": {}, "prefix": {}}

    def pairs(table, axis, kind, labels=("shared", "independent")):
        for k in table[axis].unique():
            rows = table[table[axis] == k]
            out = report[kind].setdefault(int(k), {})
            for on, label in zip((True, False), labels):
                row = rows[rows["enable_prefix_caching"] == on].iloc[0]
                if row["status"] != "ok":
                    raise RuntimeError(f"{kind} {axis}={k} prefix caching {on}: {row['error']}")
                out[label] = dict(_run(read_summary(row["run_dir"])), run_dir=row["run_dir"])
        return table

    extra = QUICK_SAMPLES if args.quick else {}
    for kind, axis, values in (("parallel", "n", widths), ("beam", "beam_width", widths)):
        pairs(_sweep(kind, {**over, **extra}, axis, values, roof), axis, kind)
        if not args.skip_hf:
            hf = _sweep(kind, {**over, **extra}, axis, values, roof, systems=("hf_static",))
            for _, row in hf.iterrows():
                s = read_summary(row["run_dir"])
                report[kind][int(row[axis])]["hf"] = (_run(s, "hf_static") if row["status"] == "ok"
                                                      else {"error": row["error"]})
    for width, r in report["beam"].items():  # sharing must not change the beams
        digests = [load_run(r[m]["run_dir"]).requests.sort_values("request_id")["output_digest"].tolist()
                   for m in ("shared", "independent")]
        assert digests[0] == digests[1], f"sharing changed the beams (width {width})"
    prefix_over = {**over, "num_prompts": max(8, 2 * n_req)}
    pairs(_sweep("prefix", prefix_over, "prefix_len", [48, 240], roof), "prefix_len", "prefix", ("cache_on", "cache_off"))
    report["prefix"] = {shots: report["prefix"][48 * shots] for shots in (1, 5)}  # keyed by shots, as before
    for r in report["prefix"].values():
        r["speedup"] = r["cache_on"]["tok_per_s"] / r["cache_off"]["tok_per_s"]

    for kind in ("parallel", "beam"):
        for k, r in report[kind].items():
            sh, ind, hf = r["shared"], r["independent"], r.get("hf", {})
            print(f"{kind} {'n' if kind == 'parallel' else 'width'}={k}: KV memory saved by sharing "
                  f"{100 * sh['saving']:.1f}% (at the peak step {100 * sh['saving_at_peak']:.1f}%; unshared run "
                  f"{100 * ind['saving']:.1f}%), peak blocks {sh['peak_blocks']} vs {ind['peak_blocks']}, "
                  f"tok/s {sh['tok_per_s']:.0f} vs {ind['tok_per_s']:.0f}"
                  + (f", transformers {hf['tok_per_s']:.0f} tok/s" if "tok_per_s" in hf else ""))
    for shots, r in report["prefix"].items():
        print(f"{shots}-shot prefix: {r['cache_on']['tok_per_s']:.0f} vs {r['cache_off']['tok_per_s']:.0f} tok/s "
              f"({r['speedup']:.2f}x), hit rate {100 * r['cache_on']['hit_rate']:.1f}%")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        write_json(args.out, report)
    return report


if __name__ == "__main__":
    main()
