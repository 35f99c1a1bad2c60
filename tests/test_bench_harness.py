"""jaxllm.bench on the host: workloads and arrivals against their distributions (seeded), metrics
against hand-computed timelines, the timed driver on a virtual clock, configs and their bad
inputs, sweeps that resume and record failures. No model, no jax: milliseconds to seconds."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pandas as pd
import pytest

from jaxllm.bench import arrivals, metrics
from jaxllm.bench.config import BenchConfig, EngineArgs, WorkloadConfig, field_path, from_dict, load_toml
from jaxllm.bench.driver import TimedDriver
from jaxllm.bench.results import is_complete, run_dir, write_json
from jaxllm.bench.sweep import grid, sweep
from jaxllm.bench.workloads import (
    LengthDist, RequestSpec, make_workload, random_workload, read_jsonl, sharegpt_workload, shared_prefix_workload,
)
from jaxllm.request import CompletionOutput, RequestMetrics, RequestOutput


# ------------------------------------------------------------------------------- workloads

def test_length_distributions_match_their_parameters():
    rng = np.random.default_rng(0)
    assert (LengthDist.parse("fixed:7").sample(100, rng) == 7).all() and LengthDist.parse(7).kind == "fixed"
    u = LengthDist.parse("uniform:10:20").sample(20000, rng)
    assert u.min() == 10 and u.max() == 20 and set(np.unique(u)) == set(range(10, 21))
    assert abs(u.mean() - 15) < 0.1 and abs(u.var() - (11**2 - 1) / 12) < 0.3  # discrete uniform variance
    # Wide clip: the log of the lengths is ~N(log median, sigma) (rounding adds a little spread).
    ln = LengthDist.parse("lognormal:200:0.5:1:100000").sample(20000, rng)
    assert abs(np.median(ln) / 200 - 1) < 0.03 and abs(np.log(ln).std() - 0.5) < 0.02
    clipped = LengthDist.parse("lognormal:20:1.0:5:30").sample(5000, rng)
    assert clipped.min() == 5 and clipped.max() == 30


def test_random_workload_is_seeded_and_avoids_special_ids():
    a = random_workload(50, "lognormal:20:1.0:3:60", "uniform:5:9", vocab_size=100, seed=3)
    b = random_workload(50, "lognormal:20:1.0:3:60", "uniform:5:9", vocab_size=100, seed=3)
    c = random_workload(50, "lognormal:20:1.0:3:60", "uniform:5:9", vocab_size=100, seed=4)
    assert a.prompts == b.prompts and a.output_lens == b.output_lens and a.prompts != c.prompts
    assert all(3 <= t < 100 for p in a.prompts for t in p)
    assert a.max_model_len == max(p + o for p, o in zip(a.prompt_lens, a.output_lens))


def test_shared_prefix_groups_share_exactly_their_prefix():
    w = shared_prefix_workload(12, num_prefix_groups=3, prefix_len=10, input_len="fixed:4", output_len=5,
                               vocab_size=1000, seed=0)
    prefixes = {}
    for r in w.requests:
        assert r.prompt_len == 14 and r.prefix_group == int(r.request_id) % 3
        prefixes.setdefault(r.prefix_group, set()).add(r.prompt_token_ids[:10])
    assert all(len(p) == 1 for p in prefixes.values()) and len({next(iter(p)) for p in prefixes.values()}) == 3
    assert len({r.prompt_token_ids for r in w.requests}) == 12  # suffixes differ


def test_n_and_beam_requests_are_carried():
    cfg = WorkloadConfig(num_prompts=4, input_len=8, output_len=4, n=3)
    assert {r.n for r in make_workload(cfg, 100).requests} == {3}
    cfg = WorkloadConfig(num_prompts=4, input_len=8, output_len=4, beam_width=2)
    assert {r.beam_width for r in make_workload(cfg, 100).requests} == {2}
    with pytest.raises(ValueError, match="not both"):
        BenchConfig(workload=WorkloadConfig(n=2, beam_width=2))


def test_sharegpt_jsonl_conversations_pairs_and_timestamps(tmp_path):
    path = tmp_path / "trace.jsonl"
    rows = [{"conversations": [{"from": "human", "value": "one two three"}, {"from": "gpt", "value": "a b"}],
             "timestamp": 0.5},
            {"prompt_len": 6, "output_len": 4, "timestamp": 1.25},
            {"conversations": [{"from": "human", "value": "x " * 50}, {"from": "gpt", "value": "y " * 50}]}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    w = sharegpt_workload(str(path), num_prompts=10, vocab_size=100, max_model_len=64)
    assert [r.prompt_len for r in w.requests] == [3, 6]  # the 100-token conversation is too long: skipped
    assert [r.output_len for r in w.requests] == [2, 4] and [r.timestamp for r in w.requests] == [0.5, 1.25]
    # A tokenizer, when given, decides the lengths.
    w = sharegpt_workload(str(path), 1, 100, tokenize=lambda s: [5] * len(s))
    assert w.requests[0].prompt_len == len("one two three") and w.requests[0].output_len == 3
    np.testing.assert_allclose(arrivals.replay([r.timestamp for r in sharegpt_workload(str(path), 2, 100).requests]),
                               [0.0, 0.75])


@pytest.mark.parametrize("line, message", [
    ("{not json", "line 2: not valid JSON"),
    ("[1, 2]", "line 2: expected a JSON object"),
    ('{"prompt_len": 0, "output_len": 3}', "line 2: prompt_len must be a positive int"),
    ('{"conversations": [{"from": "human", "value": "hi"}]}', "line 2: 'conversations' must be"),
    ('{"text": "hello"}', "line 2: needs 'conversations'"),
    ('{"prompt_len": 3, "output_len": 3, "timestamp": -1}', "line 2: timestamp"),
])
def test_malformed_jsonl_line_is_named(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt_len": 3, "output_len": 3}\n' + line + "\n")
    with pytest.raises(ValueError, match=message):
        read_jsonl(str(path))


# ------------------------------------------------------------------------------- arrivals

def test_offline_arrivals_are_all_at_zero():
    assert (arrivals.arrival_times(5) == 0).all()


@pytest.mark.parametrize("burstiness", [0.25, 1.0, 4.0])
def test_gamma_arrivals_have_the_rate_and_burstiness(burstiness):
    rate, n = 8.0, 40000
    t = arrivals.arrival_times(n, rate, burstiness, seed=1)
    gaps = np.diff(t)
    assert t[0] == 0 and (gaps >= 0).all()
    # Gamma(k, 1 / (rate k)): mean 1 / rate, coefficient of variation 1 / sqrt(k) (Poisson: 1).
    assert abs(gaps.mean() * rate - 1) < 0.03
    assert abs(gaps.std() / gaps.mean() - 1 / math.sqrt(burstiness)) < 0.05
    if burstiness == 1.0:  # exponential: P(gap > mean) = 1/e
        assert abs(np.mean(gaps > 1 / rate) - math.exp(-1)) < 0.01
    np.testing.assert_array_equal(t, arrivals.arrival_times(n, rate, burstiness, seed=1))


@pytest.mark.parametrize("rate", [0, -1.0, float("nan")])
def test_bad_rate_is_named(rate):
    with pytest.raises(ValueError, match="request_rate"):
        arrivals.arrival_times(3, rate)
    with pytest.raises(ValueError, match="request_rate"):
        WorkloadConfig(request_rate=rate)


def test_replay_shifts_and_checks_timestamps():
    np.testing.assert_allclose(arrivals.replay([10.0, 10.5, 12.0]), [0, 0.5, 2.0])
    with pytest.raises(ValueError, match="must not decrease"):
        arrivals.replay([1.0, 0.5])
    with pytest.raises(ValueError, match="no timestamp"):
        arrivals.replay([1.0, None])


# ------------------------------------------------------------------------------- metrics

def _metrics(arrival, first_scheduled, token_times, preemptions=0, cached=0):
    m = RequestMetrics(arrival_time=arrival, first_scheduled_time=first_scheduled, num_prompt_tokens=0)
    m.token_times = list(token_times)
    m.first_token_time, m.last_token_time = token_times[0], token_times[-1]
    m.finished_time = token_times[-1]
    m.num_output_tokens, m.num_preemptions, m.num_cached_tokens = len(token_times), preemptions, cached
    return m


def _timeline():
    """Two requests, times in seconds: A arrives at 0, tokens at 0.1 0.3 0.4; B arrives at 0.2,
    tokens at 0.5 and 1.0, preempted once; C was refused."""
    return metrics.request_table([
        metrics.request_row("A", 10, 3, _metrics(0.0, 0.05, [0.1, 0.3, 0.4])),
        metrics.request_row("B", 20, 2, _metrics(0.2, 0.3, [0.5, 1.0], preemptions=1, cached=16)),
        metrics.request_row("C", 5, 2, None, error="refused"),
    ])


def test_summary_against_a_hand_computed_timeline():
    s = metrics.summarize(_timeline(), None, duration=1.0, slos={"ttft": 200, "tpot": 200})
    assert s["completed"] == 2 and s["failed"] == 1
    assert s["total_input_tokens"] == 30 and s["total_output_tokens"] == 5
    assert s["request_throughput"] == 2.0 and s["output_throughput"] == 5.0 and s["total_token_throughput"] == 35
    # TTFT: A 0.1, B 0.3. TPOT: A (0.4 - 0.1) / 2 = 0.15, B 0.5. ITL gaps: 0.2, 0.1, 0.5. E2E: 0.4, 0.8.
    assert s["mean_ttft_ms"] == pytest.approx(200) and s["median_ttft_ms"] == pytest.approx(200)
    assert s["p90_ttft_ms"] == pytest.approx(100 + 0.9 * 200)  # linear interpolation between 100 and 300
    assert s["p99_ttft_ms"] == pytest.approx(100 + 0.99 * 200)
    assert s["mean_tpot_ms"] == pytest.approx(325) and s["p90_tpot_ms"] == pytest.approx(150 + 0.9 * 350)
    assert s["mean_itl_ms"] == pytest.approx(800 / 3) and s["median_itl_ms"] == pytest.approx(200)
    assert s["p90_itl_ms"] == pytest.approx(200 + 0.8 * 300)  # sorted gaps 100, 200, 500
    assert s["mean_e2el_ms"] == pytest.approx(600) and s["p99_e2el_ms"] == pytest.approx(400 + 0.99 * 400)
    # Goodput: A meets TTFT 200 and TPOT 200; B's TTFT 300 does not; C failed.
    assert s["goodput"] == 1.0 and s["num_preemptions"] == 1
    assert metrics.summarize(_timeline(), None, 2.0, slos={"e2el": 1000})["goodput"] == 1.0
    assert metrics.good_requests(_timeline(), {"tpot": 400}).tolist() == [True, False, False]


def test_bad_slo_and_duration_are_named():
    with pytest.raises(ValueError, match="unknown SLO 'latency'"):
        metrics.summarize(_timeline(), None, 1.0, slos={"latency": 5})
    with pytest.raises(ValueError, match="SLO ttft must be > 0"):
        metrics.summarize(_timeline(), None, 1.0, slos={"ttft": 0})
    with pytest.raises(ValueError, match="duration"):
        metrics.summarize(_timeline(), None, 0.0)


def _step(i, **kw):
    base = dict(step=i, start_time=0.1 * i, time=0.1 * i + 0.08, end_time=0.1 * i + 0.1, num_scheduled_requests=2,
                num_prefill_requests=1, num_decode_requests=1, num_batched_tokens=9, num_prefill_tokens=8,
                num_decode_tokens=1, num_padded_tokens=16, num_context_tokens=20, scheduled=(("A", 8), ("B", 1)),
                num_running=2, num_waiting=0, num_preempted=0, num_preempted_recompute=0, num_preempted_swap=0,
                preempted=(), num_blocks_swapped_out=0, num_blocks_swapped_in=0, num_finished=0,
                kv_blocks_used=3, kv_blocks_referenced=4, kv_blocks_free=7, kv_blocks_cached=0, num_kv_blocks=10,
                prefix_cache_queries=10, prefix_cache_hits=5, host_time=0.02, device_time=0.08, compile_time=0.0)
    base.update(kw)
    from jaxllm.observers import StepStats

    return StepStats(**base)


def test_step_summary_against_hand_computed_steps():
    steps = metrics.step_table([_step(0, compile_time=0.05),
                                _step(1, kv_blocks_used=5, num_preempted=2, num_preempted_swap=1,
                                      num_preempted_recompute=1, preempted=("B", "C"), prefix_cache_queries=0,
                                      prefix_cache_hits=0)], origin=0.0)
    assert json.loads(steps["scheduled"][0]) == [["A", 8], ["B", 1]] and json.loads(steps["preempted"][1]) == ["B", "C"]
    s = metrics.step_summary(steps, block_size=4)
    assert s["num_steps"] == 2 and s["kv_usage_mean"] == pytest.approx(0.4) and s["kv_usage_max"] == 0.5
    assert s["num_preempted_swap"] == 1 and s["num_preempted_recompute"] == 1
    assert s["compile_time_during_run_s"] == pytest.approx(0.05)
    assert s["prefix_cache_hit_rate"] == 0.5 and s["token_padding_frac"] == pytest.approx(1 - 18 / 32)
    assert s["kv_sharing_saving"] == pytest.approx(1 - 8 / 8) and s["prefill_token_frac"] == pytest.approx(16 / 18)
    assert s["kv_token_fill"] == pytest.approx(40 / (8 * 4))
    assert s["device_time_s"] == pytest.approx(0.16) and s["step_time_s"] == pytest.approx(0.2)


def test_step_summary_sharing_at_the_peak_prefill_and_swaps():
    """The sharing saving at the step referencing the most blocks, the blocks held, the prompt
    tokens computed and the blocks swapped, by hand."""
    steps = metrics.step_table([_step(0, kv_blocks_used=3, kv_blocks_referenced=4),
                                _step(1, kv_blocks_used=5, kv_blocks_referenced=8, num_prefill_tokens=0,
                                      num_blocks_swapped_out=3, num_blocks_swapped_in=2),
                                _step(2, kv_blocks_used=4, kv_blocks_referenced=6)], origin=0.0)
    s = metrics.step_summary(steps)
    assert s["kv_sharing_saving"] == pytest.approx(1 - 12 / 18)
    assert s["kv_sharing_saving_at_peak"] == pytest.approx(1 - 5 / 8)  # step 1 references the most
    assert s["kv_blocks_used_max"] == 5 and s["kv_blocks_used_mean"] == pytest.approx(4.0)
    assert s["total_prefill_tokens"] == 16
    assert s["num_blocks_swapped_out"] == 3 and s["num_blocks_swapped_in"] == 2


def test_kv_memory_fill_of_paging_and_static_reservation():
    from jaxllm.bench.memory import kv_memory_fill

    # Step 0: A (prompt 10 + output 3 = 13) and B (20 + 2 = 22, two samples "0_B", "1_B") hold
    # 20 tokens in 4 referenced blocks of 8 slots; step 1: only A, 12 tokens in 2 blocks.
    steps = metrics.step_table([_step(0, scheduled=(("A", 8), ("0_B", 1), ("1_B", 1)), num_context_tokens=20,
                                      kv_blocks_referenced=4),
                                _step(1, scheduled=(("A", 1),), num_context_tokens=12, kv_blocks_referenced=2)])
    fill = kv_memory_fill(steps, _timeline(), block_size=8, max_model_len=100)
    assert fill["paged"] == pytest.approx(32 / 48)
    assert fill["static_max"] == pytest.approx(32 / 400)
    assert fill["static_pow2"] == pytest.approx(32 / (16 + 32 + 32 + 16))
    assert fill["static_oracle"] == pytest.approx(32 / (13 + 22 + 22 + 13))


def test_ratios_skip_peers_without_numbers():
    r = metrics.ratios({"jaxllm": {"output_throughput": 30.0, "request_throughput": 3.0},
                        "hf_static": {"output_throughput": 10.0, "request_throughput": 1.0},
                        "vllm": {"skipped": "no venv"}, "hf_continuous": {"error": "boom"}})
    assert r == {"jaxllm_vs_hf_static": {"output_throughput": 3.0, "request_throughput": 3.0}}


# ------------------------------------------------------------------------------- the timed driver

class VirtualClock:
    def __init__(self):
        self.t = 0.0
        self.waits = []

    def __call__(self):
        return self.t

    def wait_until(self, t):
        self.waits.append(t)
        self.t = max(self.t, t)


class FakeEngine:
    """Engine-like: each step takes 0.1 virtual seconds and gives every unfinished request one
    token (the shape a simulator offers: add_request / step / has_unfinished_requests / observers)."""

    def __init__(self, clock):
        self.clock, self.live, self.observers = clock, {}, []

    def add_request(self, request_id, prompt, params, arrival_time=None):
        if params.max_tokens > 50:
            raise ValueError(f"max_tokens={params.max_tokens} too large")
        m = RequestMetrics(arrival_time=arrival_time, num_prompt_tokens=len(prompt["prompt_token_ids"]))
        self.live[request_id] = (m, params.max_tokens, prompt)

    def has_unfinished_requests(self):
        return bool(self.live)

    def add_step_observer(self, fn):
        self.observers.append(fn)

    def remove_step_observer(self, fn):
        self.observers.remove(fn)

    def step(self):
        start = self.clock.t
        self.clock.t += 0.1
        outs = []
        for rid, (m, want, prompt) in list(self.live.items()):
            m.first_scheduled_time = m.first_scheduled_time or start
            m.token_times.append(self.clock.t)
            m.num_output_tokens += 1
            m.first_token_time = m.first_token_time or self.clock.t
            m.last_token_time = self.clock.t
            done = m.num_output_tokens == want
            if done:
                m.finished_time = self.clock.t
                del self.live[rid]
            outs.append(RequestOutput(rid, None, prompt["prompt_token_ids"], None,
                                      [CompletionOutput(0, "", [7] * m.num_output_tokens)], done, m))
        for fn in self.observers:
            fn(_step(len(self.observers)))
        return outs


def test_driver_on_a_virtual_clock_against_a_hand_computed_timeline():
    from jaxllm.sampling_params import SamplingParams

    clock = VirtualClock()
    engine = FakeEngine(clock)
    specs = [RequestSpec("A", (5, 6), 3), RequestSpec("B", (5,), 2), RequestSpec("bad", (5,), 99)]
    reqs = [(s, SamplingParams(max_tokens=s.output_len, ignore_eos=True)) for s in specs]
    res = TimedDriver(engine, clock=clock, wait_until=clock.wait_until).run(reqs, [0.0, 1.0, 1.05])
    # A runs 0 -> 0.3, the engine idles until B arrives at 1.0, B runs 1.0 -> 1.2 ("bad" is refused at 1.1).
    assert clock.waits == [1.0] and res.start_time == 0.0 and res.end_time == pytest.approx(1.2)
    assert res.errors == {"bad": "max_tokens=99 too large"} and len(res.steps) == 5
    a, b = res.outputs["A"].metrics, res.outputs["B"].metrics
    assert a.token_times == pytest.approx([0.1, 0.2, 0.3]) and b.token_times == pytest.approx([1.1, 1.2])
    assert b.arrival_time == 1.0 and b.ttft == pytest.approx(0.1) and a.mean_tpot == pytest.approx(0.1)
    rows = [metrics.request_row(s.request_id, s.prompt_len, s.output_len, res.outputs[s.request_id].metrics)
            for s in specs[:2]] + [metrics.request_row("bad", 1, 99, None, error=res.errors["bad"])]
    s = metrics.summarize(metrics.request_table(rows), None, res.duration)
    assert s["completed"] == 2 and s["failed"] == 1 and s["request_throughput"] == pytest.approx(2 / 1.2)
    assert s["mean_e2el_ms"] == pytest.approx(250) and s["mean_ttft_ms"] == pytest.approx(100)


def test_driver_admits_late_requests_at_their_scheduled_arrival():
    """A request whose arrival passes during a step is added after it, stamped with its arrival
    time: the wait counts in its TTFT."""
    from jaxllm.sampling_params import SamplingParams

    clock = VirtualClock()
    specs = [RequestSpec("A", (5,), 2), RequestSpec("B", (5,), 1)]
    reqs = [(s, SamplingParams(max_tokens=s.output_len)) for s in specs]
    res = TimedDriver(FakeEngine(clock), clock=clock, wait_until=clock.wait_until).run(reqs, [0.0, 0.05])
    b = res.outputs["B"].metrics
    assert b.arrival_time == 0.05 and b.first_token_time == pytest.approx(0.2) and b.ttft == pytest.approx(0.15)
    with pytest.raises(ValueError, match="2 requests but 1 arrival"):
        TimedDriver(FakeEngine(clock), clock=clock, wait_until=clock.wait_until).run(reqs, [0.0])


# ------------------------------------------------------------------------------- configs

def test_config_from_toml_flat_and_dotted(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('model = "random:tiny"\nsystems = ["jaxllm", "hf_static"]\nslo_ttft_ms = 500\n'
                    '[engine]\nblock_size = 8\ntoken_buckets = [16, 64]\n'
                    '[workload]\nnum_prompts = 5\nrequest_rate = "inf"\ninput_len = 12\n'
                    '[sweep]\nblock_size = [8, 16]\n')
    cfg, axes = load_toml(str(path))
    assert cfg.engine.block_size == 8 and cfg.engine.token_buckets == (16, 64) and cfg.systems == ("jaxllm", "hf_static")
    assert cfg.workload.num_prompts == 5 and math.isinf(cfg.workload.request_rate) and axes == {"block_size": [8, 16]}
    assert from_dict({"block_size": 8, "workload.num_prompts": 5, "systems": ["jaxllm", "hf_static"],
                      "engine": {"token_buckets": [16, 64]}, "model": "random:tiny", "slo_ttft_ms": 500,
                      "input_len": 12}) == cfg
    assert field_path("engine.max_num_seqs") == ("engine", "max_num_seqs") and field_path("seed") == ("workload", "seed")
    assert cfg.config_hash() == from_dict(cfg.to_dict()).config_hash()
    assert cfg.config_hash() != cfg.replace(block_size=16).config_hash()
    assert cfg.config_hash() == cfg.replace(output_dir="/elsewhere").config_hash()  # where results go is no setting
    # The KV cache is sized one way, the one set last.
    blocks = cfg.replace(num_kv_blocks=64).engine
    assert blocks.num_kv_blocks == 64 and blocks.kv_cache_memory_bytes is None
    budget = cfg.replace(num_kv_blocks=64).replace(kv_cache_memory_bytes=1 << 20).engine
    assert budget.num_kv_blocks is None and budget.kv_cache_memory_bytes == 1 << 20


@pytest.mark.parametrize("toml, message", [
    ("blok_size = 8\n", "unknown config field 'blok_size'"),
    ("[engine]\nnum_prompts = 3\n", "unknown config field 'engine.num_prompts'"),
    ("[workload]\nrequest_rate = 0\n", "request_rate must be > 0"),
    ("[workload]\ninput_len = 'gauss:3'\n", "length distribution 'gauss:3'"),
    ("systems = ['jaxllm', 'tgi']\n", "unknown system 'tgi'"),
    ("[workload]\ndataset_name = 'sharegpt'\n", "needs dataset_path"),
    ("model = \n", "not valid TOML"),
])
def test_bad_config_files_are_named(tmp_path, toml, message):
    path = tmp_path / "bad.toml"
    path.write_text(toml)
    with pytest.raises(ValueError, match=message):
        load_toml(str(path))


def test_replace_checks_fields_across_sections_at_once():
    """A change in two sections is checked once, with both in place (a victim that fits the new
    step budget is fine); the preemption cost, off by default, leaves earlier hashes alone."""
    cfg = BenchConfig(engine=EngineArgs(max_num_batched_tokens=512), preemption_cost_tokens=256)
    small = cfg.replace(max_num_batched_tokens=128, preemption_cost_tokens=128)
    assert small.engine.max_num_batched_tokens == 128 and small.preemption_cost_tokens == 128
    with pytest.raises(ValueError, match="preemption_cost_tokens=256 must fit one step"):
        cfg.replace(max_num_batched_tokens=128)
    with pytest.raises(ValueError, match="preemption_cost_reps"):
        BenchConfig(preemption_cost_tokens=16, preemption_cost_reps=0)
    assert BenchConfig(preemption_cost_reps=9).config_hash() == BenchConfig().config_hash()
    assert cfg.config_hash() != cfg.replace(preemption_cost_tokens=64).config_hash()


def test_a_policy_object_is_named_in_the_config():
    from jaxllm.core.policies import FCFSPolicy

    class MyPolicy(FCFSPolicy):
        pass

    d = BenchConfig(engine=EngineArgs(scheduling_policy=MyPolicy())).to_dict()
    assert d["engine"]["scheduling_policy"].endswith("MyPolicy")


# ------------------------------------------------------------------------------- sweeps

def _fake_runner(calls, fail_at=None):
    """A run function writing what run_benchmark writes, without a model: a summary whose output
    throughput is 10 * block_size; the point with block_size == fail_at raises."""
    from jaxllm.bench.results import Run

    def run(cfg, roofline=None, log=None):
        calls.append(cfg.engine.block_size)
        if cfg.engine.block_size == fail_at:
            raise RuntimeError(f"out of blocks at block_size={fail_at}")
        path = run_dir(cfg)
        os.makedirs(path, exist_ok=True)
        summary = {"status": "ok", "error": None, "ratios": {"jaxllm_vs_hf_static": {"output_throughput": 2.0}},
                   "systems": {"jaxllm": {"output_throughput": 10.0 * cfg.engine.block_size,
                                          "p90_ttft_ms": cfg.workload.request_rate}}}
        write_json(os.path.join(path, "summary.json"), summary)
        return Run(path, cfg.to_dict(), pd.DataFrame(), pd.DataFrame(), summary)

    return run


def test_sweep_records_a_failure_goes_on_and_resumes(tmp_path):
    base = BenchConfig(output_dir=str(tmp_path), measure_roofline=False)
    axes = {"block_size": [8, 16, 32], "request_rate": [1.0, 2.0]}
    calls = []
    table = sweep(base, axes, log=lambda *a: None, run_fn=_fake_runner(calls, fail_at=16))
    assert calls == [8, 8, 16, 16, 32, 32] and len(table) == 6
    assert table["status"].tolist() == ["ok", "ok", "failed", "failed", "ok", "ok"]
    assert table["error"][2] == "RuntimeError: out of blocks at block_size=16"
    assert table["output_throughput"][4] == 320 and table["jaxllm_vs_hf_static_output_throughput"][0] == 2.0
    assert table["p90_ttft_ms"].tolist()[:2] == [1.0, 2.0] and os.path.exists(table.attrs["path"])
    assert not is_complete(run_dir(base.replace(block_size=16, request_rate=1.0)))
    # Resume: the finished points are skipped; only the failed ones run again (and now pass).
    calls2 = []
    table2 = sweep(base, axes, log=lambda *a: None, run_fn=_fake_runner(calls2))
    assert calls2 == [16, 16] and (table2["status"] == "ok").all()
    assert table2["output_throughput"].tolist() == [80, 80, 160, 160, 320, 320]


def test_sweep_refuses_bad_fields_and_values_before_running(tmp_path):
    base = BenchConfig(output_dir=str(tmp_path), measure_roofline=False)
    calls = []
    with pytest.raises(ValueError, match="unknown config field 'blocksize'"):
        sweep(base, {"block_size": [8], "blocksize": [8]}, run_fn=_fake_runner(calls))
    with pytest.raises(ValueError, match="request_rate must be > 0"):
        sweep(base, {"block_size": [8, 16], "request_rate": [1.0, 0.0]}, run_fn=_fake_runner(calls))
    with pytest.raises(ValueError, match="non-empty list"):
        grid({"block_size": []})
    assert calls == [] and not os.listdir(tmp_path)


def test_experiment_configs_load():
    """Every TOML under experiments/configs is a valid config, and its sweep axes name real fields."""
    import glob

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    paths = sorted(glob.glob(os.path.join(root, "experiments", "configs", "*.toml")))
    assert paths
    for path in paths:
        cfg, axes = load_toml(path)
        points = grid(axes) if axes else [{}]
        assert all(cfg.replace(**p) for p in points), path


def _fake_sim_system(model_dir, workload, arrivals, cfg):
    """A system on a virtual clock (the way a simulator plugs in): the timed driver with an
    injected clock and wait, around an Engine-like object."""
    from jaxllm.bench.systems import SystemResult
    from jaxllm.sampling_params import SamplingParams

    clock = VirtualClock()
    res = TimedDriver(FakeEngine(clock), clock=clock, wait_until=clock.wait_until).run(
        [(s, SamplingParams(max_tokens=s.output_len)) for s in workload.requests], arrivals)
    rows = [metrics.request_row(s.request_id, s.prompt_len, s.output_len, res.outputs[s.request_id].metrics)
            for s in workload.requests]
    return SystemResult("vclock", metrics.request_table(rows), metrics.step_table(res.steps), res.duration, {})


def _failing_system(model_dir, workload, arrivals, cfg):
    raise RuntimeError("out of memory")


def test_run_benchmark_with_a_registered_system_and_a_failing_one(tmp_path):
    """run_benchmark end to end without a model: a registered virtual-clock system runs at its
    Poisson arrivals; a failing system is recorded and the run goes on; the run directory reads
    back as DataFrames."""
    from jaxllm.bench import load_run, run_benchmark
    from jaxllm.bench.systems import RUNNERS, register_system

    register_system("vclock", f"{__name__}:_fake_sim_system")
    register_system("boom", f"{__name__}:_failing_system")
    try:
        cfg = BenchConfig(model=str(tmp_path / "no-such-model"), systems=("vclock", "boom"), measure_roofline=False,
                          output_dir=str(tmp_path / "runs"), slo_ttft_ms=150,
                          workload=WorkloadConfig(num_prompts=5, input_len=4, output_len="uniform:1:3",
                                                  request_rate=2.0, seed=1))
        run = run_benchmark(cfg, log=lambda *a: None)
    finally:
        RUNNERS.pop("vclock")
        RUNNERS.pop("boom")
    s = run.summary
    assert s["status"] == "ok" and s["systems"]["boom"]["error"] == "RuntimeError: out of memory"
    sim = s["systems"]["vclock"]
    expected_arrivals = arrivals.arrival_times(5, 2.0, 1.0, seed=1)
    back = load_run(run.path)
    assert back.requests["arrival_time"].to_numpy() == pytest.approx(expected_arrivals)
    # A request arriving to an idle engine gets its first token after one 0.1 s step; one
    # arriving during a step waits for it to end.
    ttft = back.requests["ttft"].to_numpy()
    assert sim["completed"] == 5 and ttft.min() == pytest.approx(0.1) and (ttft <= 0.2 + 1e-9).all()
    assert ttft[0] == pytest.approx(0.1) and sim["goodput"] == pytest.approx((ttft <= 0.15).sum() / sim["duration_s"])
    assert sim["num_steps"] == len(back.steps) <= int(back.requests["output_len"].sum())
    assert back.config["config_hash"] == cfg.config_hash() and back.summary == s
    with pytest.raises(ValueError, match="unknown system 'vclock'"):
        BenchConfig(systems=("vclock",))


def test_sim_system_predicts_on_the_same_workload_and_is_labelled(tmp_path):
    """`systems = ["sim"]`: a SimulatedEngine (virtual clock, no jax, no weights: only config.json)
    runs the workload at its arrivals through the same driver; its summary and the sweep rows say
    it is a prediction; the cost model is a profile name or a fitted JSON; a bad one is named."""
    from jaxllm.bench import load_run, run_benchmark
    from jaxllm.bench.run import report
    from jaxllm.sim import LinearCostModel

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(dict(
        architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=512, hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        rms_norm_eps=1e-6, eos_token_id=2, bos_token_id=1)))
    cost = tmp_path / "fitted.json"
    LinearCostModel({"device": {"step": 0.01}}).save(str(cost))
    cfg = BenchConfig(model=str(model), systems=("sim",), measure_roofline=False, output_dir=str(tmp_path / "runs"),
                      engine=EngineArgs(num_kv_blocks=64, max_num_seqs=4, max_num_batched_tokens=32),
                      workload=WorkloadConfig(num_prompts=12, input_len="uniform:4:20", output_len=5,
                                              request_rate=50.0, seed=2))
    run = run_benchmark(cfg, log=lambda *a: None)
    s = run.summary["systems"]["sim"]
    assert s["kind"] == "predicted" and "not a measurement" in s["prediction"]
    assert s["completed"] == 12 and s["total_output_tokens"] == 60 and s["num_steps"] > 0
    assert load_run(run.path).requests["arrival_time"].to_numpy() == pytest.approx(arrivals.arrival_times(12, 50.0, seed=2))
    assert "sim*" in report(run) and "a model, not a measurement" in report(run)
    # A fitted cost model of 10 ms a step: the simulated duration is 10 ms x steps (plus idle gaps).
    fitted = run_benchmark(cfg.replace(sim_cost_model=str(cost)), log=lambda *a: None).summary["systems"]["sim"]
    assert fitted["step_time_s"] == pytest.approx(0.01 * fitted["num_steps"])
    assert cfg.replace(sim_cost_model="tpu-v5e").config_hash() != cfg.config_hash()
    assert BenchConfig(sim_cost_model="tpu-v5e").config_hash() == BenchConfig().config_hash()  # jaxllm only
    bad = run_benchmark(cfg.replace(sim_cost_model="tpu-v9"), log=lambda *a: None).summary
    assert bad["status"] == "failed" and "sim_cost_model must be a hardware profile" in bad["systems"]["sim"]["error"]
    # A sweep: one row per point and system, each saying what kind of number it holds.
    table = sweep(cfg.replace(request_rate=math.inf), {"max_num_seqs": [1, 4]}, log=lambda *a: None)
    assert table["system"].tolist() == ["sim", "sim"] and (table["kind"] == "predicted").all()
    assert table["output_throughput"][1] > table["output_throughput"][0]  # offline: 4 rows a step beat 1
