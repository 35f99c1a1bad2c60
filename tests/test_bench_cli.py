"""`jaxllm bench` end to end on a tiny random model: a timed (Poisson) run through the real
engine writes its run directory, the tables read back as DataFrames, and bad input is named
before anything runs. Structure and invariants only: no timing assertions (the box is shared)."""

from __future__ import annotations

import json
import os

import pytest

from jaxllm.cli import main as jaxllm_main


def _flags(tmp_path):
    return ["--model", "random:tiny", "--model-cache-dir", str(tmp_path / "models"), "--output-dir",
            str(tmp_path / "runs"), "--num-prompts", "6", "--input-len", "uniform:4:12", "--output-len", "4",
            "--max-num-seqs", "4", "--max-num-batched-tokens", "32", "--token-buckets", "32",
            "--num-kv-blocks", "64", "--roofline-size", "quick", "--quiet"]


def test_bench_throughput_timed_run(tmp_path, capsys):
    from jaxllm.bench import load_run

    out = tmp_path / "summary.json"
    rc = jaxllm_main(["bench", "throughput", *_flags(tmp_path), "--request-rate", "50", "--burstiness", "0.5",
                      "--systems", "jaxllm,vllm,sim", "--goodput", "ttft:60000", "--output-json", str(out), "--plots"])
    assert rc == 0
    summary = json.loads(out.read_text())
    (run_dir,) = [os.path.join(tmp_path / "runs", d) for d in os.listdir(tmp_path / "runs")]
    run = load_run(run_dir)
    assert run.summary == summary and run.config["config"]["workload"]["request_rate"] == 50.0
    assert run.config["versions"]["jax"] and run.config["machine"]["cpu_count"] and "git_commit" in run.config
    j = summary["systems"]["jaxllm"]
    assert j["completed"] == 6 and j["failed"] == 0 and j["total_output_tokens"] == 24
    assert j["info"]["new_compilations_during_run"] == 0 and j["compile_time_during_run_s"] == 0
    assert 0 < j["median_ttft_ms"] <= j["p90_ttft_ms"] <= j["p99_ttft_ms"] and j["goodput"] == j["request_throughput"]
    assert 0 < j["roofline"]["fraction_of_roofline"] <= 1 and summary["roofline"]["matmul_flops"] > 0
    assert "skipped" in summary["systems"]["vllm"] or "output_throughput" in summary["systems"]["vllm"]
    # The simulator on the same workload and arrivals (default cost model h100-sxm): a prediction.
    sim = summary["systems"]["sim"]
    assert sim["kind"] == "predicted" and j["kind"] == "measured" and "not a measurement" in sim["prediction"]
    assert sim["completed"] == 6 and sim["total_output_tokens"] == 24 and sim["num_steps"] > 0
    by = {name: g.sort_values("request_id") for name, g in run.requests.groupby("system")}
    assert by["sim"]["arrival_time"].to_numpy() == pytest.approx(by["jaxllm"]["arrival_time"].to_numpy())
    assert (by["sim"]["prompt_len"].to_numpy() == by["jaxllm"]["prompt_len"].to_numpy()).all()
    # The tables: one row per request, arrivals spread by the Poisson process, one row per step.
    r = run.requests[run.requests["system"] == "jaxllm"]
    assert len(r) == 6 and {"jaxllm", "sim"} <= set(run.requests["system"]) and r["arrival_time"].is_monotonic_increasing
    assert r["arrival_time"].iloc[-1] > 0 and (r["first_token_time"] >= r["arrival_time"]).all()
    assert (r["num_output_tokens"] == 4).all() and r["error"].isna().all()
    assert run.steps.query("system == 'jaxllm'")["num_batched_tokens"].sum() == r["prompt_len"].sum() + 6 * 3  # prompts + 3 decodes each
    assert {"cdf_ttft.png", "kv_usage.png", "batch_composition.png"} <= set(os.listdir(run_dir))
    from jaxllm.bench.run import latency_table

    table = latency_table(run)
    assert all(f"jaxllm         {k}" in table for k in ("ttft", "tpot", "itl", "e2el"))


def test_bench_bad_input_is_named_before_anything_runs(tmp_path, capsys):
    assert jaxllm_main(["bench", "sweep", *_flags(tmp_path), "--sweep", "blocksize=8,16"]) == 2
    assert "unknown config field 'blocksize'" in capsys.readouterr().err
    assert jaxllm_main(["bench", "throughput", *_flags(tmp_path), "--request-rate", "0"]) == 2
    assert "request_rate must be > 0" in capsys.readouterr().err
    assert jaxllm_main(["bench", "latency", *_flags(tmp_path), "--block-size", "big"]) == 2
    assert "block_size: cannot read 'big'" in capsys.readouterr().err
    bad = tmp_path / "bad.toml"
    bad.write_text("[workload]\nnum_promts = 3\n")
    assert jaxllm_main(["bench", "throughput", "--config", str(bad)]) == 2
    assert "unknown config field 'workload.num_promts'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        jaxllm_main(["bench", "throughput", "--no-such-flag"])
    assert not (tmp_path / "runs").exists() and not (tmp_path / "models").exists()


def test_bench_serve_dispatches_its_flags_or_says_what_is_missing(monkeypatch, capsys):
    """`jaxllm bench serve ...` hands every flag (even --help) to the serving benchmark's module
    (the server helper's add_arguments / main contract), and names it when it is missing."""
    import sys
    import types

    name = "jaxllm.entrypoints.openai.bench_serve"
    monkeypatch.setitem(sys.modules, name, None)  # as if not installed
    assert jaxllm_main(["bench", "serve", "--request-rate", "2"]) == 2
    assert name in capsys.readouterr().err

    seen = {}
    fake = types.ModuleType(name)
    fake.add_arguments = lambda parser: parser.add_argument("--request-rate", type=float)
    fake.main = lambda args: seen.setdefault("args", args) and 0
    monkeypatch.setitem(sys.modules, name, fake)
    assert jaxllm_main(["bench", "serve", "--request-rate", "2"]) == 0 and seen["args"].request_rate == 2.0
    with pytest.raises(SystemExit) as e:
        jaxllm_main(["bench", "serve", "--help"])
    assert e.value.code == 0 and "--request-rate" in capsys.readouterr().out
