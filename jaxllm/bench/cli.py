"""`jaxllm bench {throughput,latency,sweep,serve}` (vLLM's `vllm bench` words).

    jaxllm bench throughput --model random:tiny --num-prompts 8 --input-len 16 --output-len 8
    jaxllm bench latency --config experiments/configs/latency.toml --request-rate 2
    jaxllm bench sweep --config experiments/configs/block_size.toml --sweep block_size=8,16,32
    jaxllm bench serve ...          (the serving benchmark: jaxllm.entrypoints.openai.bench_serve)

Every config field (bench/config.py) is a flag of the same name (`--num-prompts`,
`--block-size`, `--enable-prefix-caching / --no-enable-prefix-caching`); a flag overrides the
TOML file given with --config, which overrides the defaults. `--goodput ttft:500 tpot:50`
states SLOs in ms as vLLM's flag does. Host only: never imports jax itself.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import math
import sys

from jaxllm.bench.config import SECTIONS, BenchConfig, all_fields, from_dict, load_toml

# Fields whose default is None (or not a plain value): how to read them from text.
_TYPES = {"num_kv_blocks": int, "kv_cache_memory_bytes": int, "max_model_len": int, "dataset_path": str,
          "slo_ttft_ms": float, "slo_tpot_ms": float, "slo_e2e_ms": float, "torch_threads": int,
          "scheduling_policy": str, "input_len": str, "output_len": str, "token_buckets": "ints",
          "systems": "strs"}
_HELP = {"model": "HF dir, .gguf, alias, or random:tiny|small|138m", "systems": "comma-separated: "
         "jaxllm,hf_static,hf_continuous,vllm", "input_len": "N or fixed:N | uniform:LO:HI | "
         "lognormal:MEDIAN:SIGMA:LO:HI", "request_rate": "requests/s; inf: all at once"}


def _defaults() -> dict:
    out = {f.name: f.default for f in dataclasses.fields(BenchConfig) if f.name not in SECTIONS}
    for cls in SECTIONS.values():
        out.update({f.name: f.default for f in dataclasses.fields(cls)})
    return out


def parse_value(name: str, text: str):
    """A field's value from command-line text (ValueError naming the field)."""
    kind = _TYPES.get(name)
    default = _defaults()[name]
    if kind is None:
        kind = type(default)
    try:
        if kind == "ints":
            return tuple(int(x) for x in text.split(","))
        if kind == "strs":
            return tuple(x for x in text.split(",") if x)
        if kind is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(text)
        if kind is float:
            return math.inf if text.lower() in ("inf", "infinity") else float(text)
        if text.lower() == "none" and default is None:
            return None
        return kind(text)
    except ValueError:
        raise ValueError(f"{name}: cannot read {text!r} as {getattr(kind, '__name__', kind)}") from None


def _add_config_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="a TOML config file (flags override it)")
    for name in all_fields():
        flag = "--" + name.replace("_", "-")
        default = _defaults()[name]
        if isinstance(default, bool):
            p.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS)
        else:
            p.add_argument(flag, dest=name, default=argparse.SUPPRESS, metavar=name.upper(),
                           help=_HELP.get(name, f"default {default!r}"))
    p.add_argument("--goodput", nargs="+", metavar="KEY:MS", default=None,
                   help="SLOs for goodput, e.g. ttft:500 tpot:50 e2el:2000 (ms)")
    p.add_argument("--output-json", default=None, help="also write the summary JSON here")
    p.add_argument("--plots", action="store_true", help="save latency CDFs, KV usage and batch plots in the run dir")
    p.add_argument("--quiet", action="store_true")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench_command", required=True)
    for name, help_text in (("throughput", "offline throughput (all requests at once unless --request-rate)"),
                            ("latency", "latency under a timed arrival process (TTFT/TPOT/ITL/e2e percentiles)"),
                            ("sweep", "one run per point of a grid over config fields; resumable")):
        p = sub.add_parser(name, help=help_text, description=help_text)
        _add_config_flags(p)
        if name == "sweep":
            p.add_argument("--sweep", action="append", default=[], metavar="FIELD=V1,V2,...",
                           help="a sweep axis (repeatable; adds to the TOML's [sweep] table)")
            p.add_argument("--plot", default=None, metavar="X:Y[:HUE]", help="save a sweep curve (PNG)")
    # Its flags are the serving benchmark's own (parsed in _serve): this parser takes no options
    # (prefix_chars that no flag uses), so even `--help` passes through to it.
    s = sub.add_parser("serve", help="the serving benchmark against a running `jaxllm serve` (its own flags)",
                       add_help=False, prefix_chars="\x00")
    s.add_argument("serve_args", nargs=argparse.REMAINDER)


def config_from_args(args) -> tuple[BenchConfig, dict]:
    """(config, sweep axes from the TOML) from parsed flags."""
    cfg, axes = (load_toml(args.config) if getattr(args, "config", None) else (BenchConfig(), {}))
    given = {name: getattr(args, name) for name in all_fields() if hasattr(args, name)}
    flat = {k: (parse_value(k, v) if isinstance(v, str) else v) for k, v in given.items()}
    if getattr(args, "goodput", None):
        keys = {"ttft": "slo_ttft_ms", "tpot": "slo_tpot_ms", "e2el": "slo_e2e_ms"}
        for item in args.goodput:
            key, _, ms = item.partition(":")
            if key not in keys:
                raise ValueError(f"--goodput {item!r}: key must be one of {sorted(keys)}")
            flat[keys[key]] = parse_value(keys[key], ms)
    return cfg.replace(**flat), axes


def _serve(args) -> int:
    try:
        module = importlib.import_module("jaxllm.entrypoints.openai.bench_serve")
    except ModuleNotFoundError as e:
        print(f"jaxllm bench serve: the serving benchmark (jaxllm.entrypoints.openai.bench_serve) is not "
              f"available in this checkout ({e})", file=sys.stderr)
        return 2
    parser = argparse.ArgumentParser(prog="jaxllm bench serve")
    module.add_arguments(parser)
    return int(module.main(parser.parse_args(args.serve_args)) or 0)


def main(args: argparse.Namespace) -> int:
    if args.bench_command == "serve":
        return _serve(args)
    try:
        import matplotlib
        import pandas  # noqa: F401
    except ImportError as e:
        print(f"jaxllm bench needs pandas and matplotlib: pip install 'jaxllm[bench]' ({e})", file=sys.stderr)
        return 2

    matplotlib.use("Agg")
    from jaxllm.bench.run import run_benchmark

    try:
        cfg, axes = config_from_args(args)
        if args.bench_command == "sweep":
            for item in args.sweep:
                field, eq, values = item.partition("=")
                if not eq or not values:
                    raise ValueError(f"--sweep {item!r}: write FIELD=V1,V2,...")
                all_fields()  # field check below names it
                from jaxllm.bench.config import field_path

                axes[field] = [parse_value(field_path(field)[1], v) for v in values.split(",")]
            if not axes:
                raise ValueError("jaxllm bench sweep needs --sweep FIELD=V1,V2 or a [sweep] table in --config")
            from jaxllm.bench.sweep import grid

            grid(axes)
    except ValueError as e:
        print(f"jaxllm bench {args.bench_command}: {e}", file=sys.stderr)
        return 2
    log = (lambda *a: None) if args.quiet else (lambda *a: print(*a, flush=True))
    if args.bench_command == "sweep":
        from jaxllm.bench.sweep import sweep

        table = sweep(cfg, axes, log=log)
        with_cols = [c for c in list(axes) + ["system", "kind", "status", "output_throughput", "request_throughput",
                                               "p90_ttft_ms", "num_preemptions"] if c in table]
        print(table[with_cols].to_string(index=False))
        print(f"wrote {table.attrs['path']}")
        if args.plot:
            from jaxllm.bench.plots import sweep_curve

            x, y, *hue = args.plot.split(":")
            path = table.attrs["path"].replace(".csv", f"_{y}_vs_{x}.png")
            sweep_curve(table, x, y, hue[0] if hue else None).savefig(path, dpi=100)
            print(f"wrote {path}")
        if args.output_json:
            table.to_json(args.output_json, orient="records", indent=2)
        return 0 if (table["status"] == "ok").all() else 1
    run = run_benchmark(cfg, log=log)
    if args.bench_command == "latency":
        from jaxllm.bench.run import latency_table

        log(latency_table(run))
    if args.plots:
        from jaxllm.bench.plots import save_run_plots

        for p in save_run_plots(run):
            log(f"wrote {p}")
    if args.output_json:
        from jaxllm.bench.results import write_json

        write_json(args.output_json, run.summary)
    log(f"results in {run.path}")
    return 0 if run.summary["status"] == "ok" else 1
