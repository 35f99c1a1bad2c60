"""jaxllm.sim: replay of a real run is exact, the optax fit recovers known coefficients, hardware
what-ifs scale as the roofline says, the simulate path imports no jax, bad input is named."""

import dataclasses
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from jaxllm import CacheConfig, EngineConfig, SamplingParams, SchedulerConfig
from jaxllm.sim import (
    FEATURES,
    PARTS,
    HardwareProfile,
    LinearCostModel,
    ModelCosts,
    RooflineCostModel,
    SimulatedEngine,
    StepShape,
    get_profile,
    model_config_from,
    replay,
    step_features,
    step_table,
)
from jaxllm.bench import TimedDriver, arrival_times
from jaxllm.bench.workloads import lengths_workload


def make_requests(prompt_lens, output_lens, arrivals, vocab_size=512, seed=0):
    """[(RequestSpec, greedy params)] with their arrival offsets (the bench workload and driver)."""
    return list(lengths_workload(prompt_lens, output_lens, vocab_size, seed=seed, prefix="r").requests), list(arrivals)


def run_workload(engine, requests):
    return TimedDriver(engine).run(*requests)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HF_CONFIG = dict(  # the tiny test model's shape, as a transformers config.json dict
    architectures=["LlamaForCausalLM"], vocab_size=512, hidden_size=64, intermediate_size=128,
    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
    max_position_embeddings=1024, eos_token_id=2, bos_token_id=1,
)


def _config(model="unused", num_kv_blocks=14, token_buckets=(16,), attention_backend="auto", **sched):
    sched = {"max_num_seqs": 4, "max_num_batched_tokens": 16, "max_model_len": 128, **sched}
    return EngineConfig(model=model, skip_tokenizer_init=True, token_buckets=token_buckets,
                        attention_backend=attention_backend,
                        cache=CacheConfig(block_size=4, num_kv_blocks=num_kv_blocks),
                        scheduler=SchedulerConfig(**sched))


def _workload(num=10, seed=0, spread=0.05):
    rng = np.random.default_rng(seed)
    reqs, arrivals = make_requests(rng.integers(6, 30, num), rng.integers(4, 14, num),
                                   np.sort(rng.uniform(0, spread, num)), vocab_size=512, seed=seed)
    # Two pairs share a prompt prefix, so the prefix cache hits during the run.
    shared = reqs[0].prompt_token_ids[:12]
    for k in (3, 7):
        reqs[k] = dataclasses.replace(reqs[k], prompt_token_ids=shared + reqs[k].prompt_token_ids[12:] + (5,))
    return reqs, arrivals


def test_replay_reproduces_a_real_engine_run(tmp_path):
    """A real tiny-model Engine run (small cache: preemption; 16-token budget: chunked prefill;
    arrivals spread over time), replayed: every step schedules the same requests with the same
    token counts and preempts the same requests."""
    from jaxllm import Engine
    from jaxllm.runner.sampling_inputs import GREEDY
    from tests.helpers.tiny_models import make_tiny_model

    path = make_tiny_model(tmp_path, arch="llama")
    config = _config(path)
    engine = Engine(config)
    engine.warmup(step_variants=((GREEDY, False),))  # compile first, so arrivals meet running steps
    # Arrivals over half of what the whole workload takes at once on this machine: spread over
    # many steps, yet close enough to fill the small cache, however fast the steps are.
    at_once = run_workload(engine, _workload(spread=0.0))
    run = run_workload(engine, _workload(spread=0.5 * at_once.duration))
    steps = run.steps_frame()
    assert len(run.requests) == 10
    assert steps.num_preempted.sum() > 0  # the cache is small enough to preempt
    assert any(n > 1 and n < 16 for sched in steps.scheduled for _, n in sched)  # chunks
    assert steps.prefix_cache_hits.sum() > 0
    assert len({r["added_at_step"] for r in run.requests}) > 2  # arrivals spread over the steps

    result = replay(run.requests_frame(), steps, config, model=path)
    assert result.matches, result.mismatches[:3]
    assert len(result.steps) == len(steps)
    assert [s.scheduled for s in result.steps] == list(steps.scheduled)
    assert [s.preempted for s in result.steps] == list(steps.preempted)
    assert [s.prefix_cache_hits for s in result.steps] == list(steps.prefix_cache_hits)

    # A different config makes different decisions, and replay says where they part.
    other = replay(run.requests, run.steps, _config(path, num_kv_blocks=40), model=path)
    assert any(m.startswith("step ") for m in other.mismatches)


def _sim(cost_model, **kw):
    return SimulatedEngine(_config(**kw), HF_CONFIG, cost_model)


def test_simulated_run_and_its_records():
    sim = _sim("h100-sxm")
    run = run_workload(sim, _workload(num=20, spread=1e-4))
    assert len(run.requests) == 20
    assert all(r["num_output_tokens"] == r_.output_len
               for r, r_ in zip(sorted(run.requests, key=lambda r: r["request_id"]),
                                sorted(_workload(num=20)[0], key=lambda r: r.request_id)))
    stats = sim.get_stats()
    assert stats["simulated"] and stats["num_preemptions"] > 0 and stats["num_kv_blocks"] == 13
    assert stats["num_generated_tokens"] == sum(r["num_output_tokens"] for r in run.requests)
    assert sim.kv_cache_manager.num_used_blocks == 0  # everything freed
    # The records' times are the cost model's: device_time = the roofline forward of that step.
    model = sim.cost_model
    for s in run.steps:
        x = step_features(StepShape.from_stats(s, 4), sim.costs, sim.resolved.bytes_per_block)
        assert s.device_time == pytest.approx(model.predict(x).device, rel=1e-9)
        assert s.host_time == pytest.approx(get_profile("h100-sxm").step_overhead_s, rel=1e-6)
    assert run.summary()["output_throughput"] > 0
    # All arrivals at once: replay must add them in the order they were added (add_index), not
    # in the order they finished.
    offline = run_workload(_sim("h100-sxm"), make_requests([20] * 12, [6] * 12, np.zeros(12)))
    assert replay(offline.requests, offline.steps, _config(), HF_CONFIG).matches


@pytest.mark.parametrize("stream", [False, True])
def test_n_greater_than_one_runs_as_children(stream):
    sim = SimulatedEngine(_config(num_kv_blocks=40), HF_CONFIG, "tpu-v5e", stream_outputs=stream)
    sim.add_request("p", {"prompt_token_ids": list(range(3, 23))}, SamplingParams(n=3, max_tokens=6, ignore_eos=True))
    outs = []
    while sim.has_unfinished_requests():
        outs += sim.step()
    assert (len(outs) > 1) == stream  # streamed: an output per step; else only the finished one
    final = [o for o in outs if o.finished]
    assert len(final) == 1 and len(final[0].outputs) == 3
    assert all(len(c.token_ids) == 6 for c in final[0].outputs)
    assert len({tuple(c.token_ids) for c in final[0].outputs}) == 3  # samples diverge
    assert sim.get_stats()["prefix_cache_hits"] > 0  # the children share the prompt's blocks


def test_fit_recovers_known_coefficients():
    """Synthetic steps with known costs: the optax fit finds them (a 1% noise floor)."""
    from jaxllm.sim.fit import fit_nonnegative

    rng = np.random.default_rng(0)
    n = 400
    X = np.column_stack([np.ones(n), rng.uniform(0, 1e12, n), rng.uniform(0, 50, n), rng.uniform(0, 1e9, n),
                         np.zeros(n)])
    true = np.array([2e-3, 2e-3 / 5e11, 2e-3 / 25, 2e-3 / 5e8, 0.0])
    y = X @ true * (1 + 0.01 * rng.standard_normal(n))
    coef = fit_nonnegative(X, y, init=np.array([0, 0, 0, 0, 7e-9]))
    np.testing.assert_allclose(coef[:4], true[:4], rtol=0.03)
    assert coef[4] == 7e-9  # never seen in the data: keeps its initial value


def test_fit_cost_model_recovers_a_simulated_machine(tmp_path):
    """Steps recorded from a SimulatedEngine whose costs are known (a LinearCostModel): fitting
    that step table gives back the same predictions; the JSON round trip keeps them."""
    from jaxllm.sim.fit import fit_cost_model

    true = LinearCostModel({
        "host_before": {"step": 4e-4, "rows": 5e-5, "tokens": 1e-5},
        "device": {"step": 2e-3, "matmul_flops": 1 / 2e10, "kv_bytes": 1 / 1e8, "attention_flops": 1 / 1e9},
        "host_after": {"step": 2e-4, "rows": 3e-5},
        "between": {"step": 1e-4},
    })
    sim = SimulatedEngine(_config(num_kv_blocks=60, token_buckets=(8, 16, 32, 64), max_num_seqs=8,
                                  max_num_batched_tokens=64),
                          HF_CONFIG, true)
    reqs = make_requests(np.random.default_rng(1).integers(4, 80, 60), np.random.default_rng(2).integers(2, 40, 60),
                         arrival_times(60, 300.0, seed=3))
    run = run_workload(sim, reqs)
    costs, bpb = sim.costs, sim.resolved.bytes_per_block
    fitted = fit_cost_model(run.steps_frame(), costs, bpb, max_num_seqs=8)
    X, targets = step_table(run.steps, costs, bpb, 8)
    pred, want = fitted.predict_table(X), true.predict_table(X)
    for part in PARTS:
        valid = targets[part][1]
        np.testing.assert_allclose(targets[part][0][valid], want[part][valid], rtol=1e-6, atol=1e-12)
        np.testing.assert_allclose(pred[part][valid], want[part][valid], rtol=0.05)
        assert abs(pred[part][valid].sum() / want[part][valid].sum() - 1) < 0.01
    for part, feature, rel in (("host_before", "rows", 0.05), ("between", "step", 0.05)):
        assert fitted.coefficients()[part][feature] == pytest.approx(true.coefficients()[part][feature], rel=rel)
    # Device: the split between the per-step constants is not identifiable here (with max_num_seqs
    # below every bucket lm_head_flops is the same in every step), nor within the work that grows
    # with the batch (matmul_flops and the query tiles' K/V reads correlate at 0.96 on this small
    # workload; kv_bytes and the per-token tiles' reads both follow the context). What each group
    # explains is: the fit must not trade per-step time for per-token time.
    from jaxllm.sim.cost_model import _F

    valid = targets["device"][1]
    work = [_F[f] for f in ("matmul_flops", "kv_bytes", "attention_flops", "decode_rows", "token_tile_kv_bytes",
                             "query_tile_kv_bytes")]
    explained = lambda m: float((X[valid][:, work] @ m.coef["device"][work]).sum())  # noqa: E731
    assert explained(fitted) == pytest.approx(explained(true), rel=0.05)
    slower = fitted.scaled(2.0).predict_table(X)
    np.testing.assert_allclose(slower["device"], 2 * pred["device"])
    path = tmp_path / "cost.json"
    fitted.save(str(path))
    assert LinearCostModel.load(str(path)).coefficients() == fitted.coefficients()


def test_attention_tile_features_by_hand_and_from_the_record():
    """The reference attention's reads (cost_model.attention_tiles) on a hand-worked batch, and a
    step record carries what the plan had: features from StepStats (row_num_computed_tokens) equal
    the plan's, so a model over them predicts the recorded device time exactly."""
    from jaxllm.sim.cost_model import attention_tiles

    # Decodes at contexts 16 and 17 (1 and 2 blocks of 16), a 3-token chunk (1 block each), and a
    # 40-token chunk after 100 cached tokens: its two query tiles need 132 and 140 keys, i.e. 144
    # (whole blocks), more than 4 chunks of 32, so chunks of 128: 256 keys read each.
    q, c = [1, 1, 3, 40], [15, 16, 0, 100]
    # One token tile of 5, its longest: 1 chunk; two query tiles of 2 chunks each.
    assert attention_tiles(q, c, 16) == (1 * 8 * 64, 2 * 256, 1 + 2 * 2, 2, 0, 0)
    # Nine more decodes needing 9 blocks: tiles [1,1,1,1,2,9,9,9] and [9 x 6], 3 chunks of 4 blocks each.
    assert attention_tiles(q + [1] * 9, c + [130] * 9, 16) == (6 * 8 * 64, 2 * 256, 6 + 4, 2, 0, 0)
    # A 20-token first chunk: one tile needing 32 keys, one chunk of 32.
    assert attention_tiles([20], [0], 16) == (0, 32, 1, 1, 0, 0)
    assert attention_tiles([], [], 16) == (0, 0, 0, 0, 0, 0)
    # The C++ kernel (attention_backend "cpu") takes every row instead of the tiles and reads
    # exactly each query's context: 16 + 17 + (1 + 2 + 3) + (40 x 100 + 40 x 41 / 2) keys, 45 queries.
    assert attention_tiles(q, c, 16, cpu_kernel=True) == (0, 0, 0, 0, 16 + 17 + 6 + 4000 + 820, 45)

    model = LinearCostModel({"device": {"decode_rows": 1e-4, "token_tile_kv_bytes": 1e-9,
                                        "query_tile_kv_bytes": 2e-9, "attention_chunks": 3e-6,
                                        "query_tiles": 5e-6, "bucket_switch": 2e-3}})
    sim = _sim(model)
    run = run_workload(sim, _workload(num=12, spread=1e-3))
    assert sim.get_stats()["num_preemptions"] > 0  # recomputed rows restart their context
    assert all(len(s.row_num_computed_tokens) == len(s.scheduled) for s in run.steps)
    # step_table reads each record's bucket switch from the record before, as the simulator saw it.
    X, _ = step_table(run.steps, sim.costs, sim.resolved.bytes_per_block, 4,
                      block_size=sim.config.cache.block_size)
    switches = X[:, FEATURES.index("bucket_switch")]
    buckets = [s.num_padded_tokens for s in run.steps]
    assert list(switches) == [1.0] + [float(a != b) for a, b in zip(buckets[1:], buckets[:-1])]
    assert 0 < switches.sum() < len(buckets)
    for s, x in zip(run.steps, X):
        assert s.device_time == pytest.approx(model.predict(x).device, rel=1e-9) and s.device_time > 0


def test_the_cpu_kernel_attention_is_fitted_and_simulated_as_recorded():
    """A cost model knows the attention it was fitted for: simulating with attention_backend="auto"
    takes it (the "cpu" kernel's features: step_table over the run reproduces its device times), and
    asking a model fitted to the kernel to simulate the reference is an error naming both."""
    from jaxllm.sim.fit import fit_cost_model

    model = LinearCostModel({"device": {"step": 1e-3, "kernel_kv_bytes": 1e-9, "kernel_tokens": 2e-5,
                                        "query_tile_kv_bytes": 2e-9}}, {"attention_backend": "cpu"})
    sim = _sim(model)
    assert sim.get_stats()["attention_backend"] == "cpu"
    run = run_workload(sim, _workload(num=12, spread=1e-3))
    X, _ = step_table(run.steps, sim.costs, sim.resolved.bytes_per_block, 4, block_size=sim.config.cache.block_size,
                      attention_backend="cpu")
    assert X[:, FEATURES.index("kernel_tokens")].sum() > 0 and X[:, FEATURES.index("token_tile_kv_bytes")].sum() == 0
    for s, x in zip(run.steps, X):
        assert s.device_time == pytest.approx(model.predict(x).device, rel=1e-9)
    fitted = fit_cost_model(run.steps, sim.costs, sim.resolved.bytes_per_block, 4, attention_backend="cpu")
    assert fitted.attention_backend == "cpu"
    with pytest.raises(ValueError, match="attention_backend='reference'.*fitted to an engine running 'cpu'"):
        SimulatedEngine(_config(attention_backend="reference"), HF_CONFIG, model)
    with pytest.raises(ValueError, match='"auto" must be resolved'):
        step_table(run.steps, sim.costs, sim.resolved.bytes_per_block, 4, attention_backend="auto")
    # Profiles and replay's zero model take any attention.
    assert _sim(LinearCostModel.zeros()).get_stats()["attention_backend"] == "reference"
    assert SimulatedEngine(_config(attention_backend="cpu"), HF_CONFIG, "tpu-v5e").get_stats()["attention_backend"] == "cpu"


def test_hardware_what_if_scales_as_the_roofline():
    """A model, not a measurement: doubling bandwidth halves a memory-bound decode step; doubling
    FLOP/s halves a compute-bound prefill step; two devices halve both."""
    mc = model_config_from(dict(HF_CONFIG, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                num_attention_heads=32, num_key_value_heads=8, vocab_size=128256))
    costs = ModelCosts.from_config(mc, "bfloat16")
    base = get_profile("h100-sxm").replace(step_overhead_s=0.0, interconnect_bandwidth=None)
    decode = step_features(StepShape(8, 8, 8, 8, 8, 8 * 1024, 0), costs, 0)
    prefill = step_features(StepShape(2048, 2048, 1, 256, 0, 2048, 2048 ** 2), costs, 0)

    def t(profile, x):
        return RooflineCostModel(profile, costs).predict(x).device

    assert t(base.replace(memory_bandwidth=2 * base.memory_bandwidth), decode) == pytest.approx(t(base, decode) / 2)
    assert t(base.replace(peak_flops=2 * base.peak_flops), decode) == pytest.approx(t(base, decode))
    assert t(base.replace(peak_flops=2 * base.peak_flops), prefill) == pytest.approx(t(base, prefill) / 2)
    assert t(base.replace(device_count=2), prefill) == pytest.approx(t(base, prefill) / 2)
    # With a finite interconnect, tensor parallelism pays for its all-reduces.
    slow_link = base.replace(device_count=2, interconnect_bandwidth=1e9)
    assert t(slow_link, prefill) > t(base.replace(device_count=2), prefill)
    # End to end: a decode-heavy simulated workload runs faster with twice the bandwidth.
    reqs = make_requests([8] * 16, [30] * 16, np.zeros(16))
    tput = [run_workload(SimulatedEngine(_config(num_kv_blocks=200), mc, p), reqs).summary()
            ["output_throughput"] for p in (base, base.replace(memory_bandwidth=2 * base.memory_bandwidth))]
    assert tput[1] > 1.5 * tput[0]


def test_simulate_path_imports_no_jax(tmp_path):
    """House rule 1, in a fresh interpreter: simulate with a roofline profile and with a cost model
    loaded from JSON, never importing jax (only jaxllm.sim.fit may)."""
    path = tmp_path / "cost.json"
    LinearCostModel({"device": {"step": 1e-3}}).save(str(path))
    code = f"""
import sys, numpy as np
from jaxllm import EngineConfig, CacheConfig, SchedulerConfig
from jaxllm.sim import SimulatedEngine, LinearCostModel
from jaxllm.bench import TimedDriver
from jaxllm.bench.workloads import lengths_workload
cfg = EngineConfig(model="unused", cache=CacheConfig(block_size=4, num_kv_blocks=40),
                   scheduler=SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=16, max_model_len=128))
for cm in ("tpu-v5e", LinearCostModel.load({str(path)!r})):
    run = TimedDriver(SimulatedEngine(cfg, {HF_CONFIG!r}, cm)).run(lengths_workload([10] * 5, [4] * 5, 512), np.zeros(5))
    assert run.summary()["completed"] == 5
bad = sorted(m for m in sys.modules if m == "jax" or m.startswith("jax.") or m == "optax")
assert not bad, bad[:5]
"""
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": ROOT})
    assert result.returncode == 0, result.stderr


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="unknown hardware profile field.*'hbm_speed'"):
        HardwareProfile.from_dict({"name": "x", "peak_flops": 1e12, "memory_bandwidth": 1e11, "hbm_speed": 1})
    with pytest.raises(ValueError, match="memory_bandwidth must be a finite number > 0, got -1"):
        get_profile("h100-sxm").replace(memory_bandwidth=-1.0)
    with pytest.raises(ValueError, match="peak_flops"):
        HardwareProfile("x", peak_flops=math.nan, memory_bandwidth=1e9)
    with pytest.raises(ValueError, match="device_count"):
        get_profile("tpu-v5e").replace(device_count=0)
    with pytest.raises(ValueError, match="unknown hardware profile 'tpu-v9'"):
        SimulatedEngine(_config(), HF_CONFIG, "tpu-v9")
    with pytest.raises(ValueError, match="request_rate must be > 0.*-2"):
        arrival_times(5, -2.0)
    with pytest.raises(ValueError, match="request_rate must be > 0.*got 0"):
        arrival_times(5, 0)
    with pytest.raises(ValueError, match="coefficient device.step must be a finite number >= 0"):
        LinearCostModel({"device": {"step": -1e-3}})
    with pytest.raises(ValueError, match="part 'device' has no feature 'rows'"):
        LinearCostModel({"device": {"rows": 1e-3}})
    with pytest.raises(ValueError, match="factor must be a finite number > 0, got -2"):
        LinearCostModel.zeros().scaled(-2)
    with pytest.raises(ValueError, match="cost_model must be"):
        SimulatedEngine(_config(), HF_CONFIG, 3.0)
    with pytest.raises(ValueError, match="no transformers config"):
        model_config_from("/nonexistent/dir")
    sim = _sim("h100-sxm")
    with pytest.raises(ValueError, match="dt=-1"):
        sim.clock.advance(-1)
    with pytest.raises(ValueError, match="200 tokens, more than max_model_len=128"):  # the engine's own validation
        sim.add_request("long", {"prompt_token_ids": [5] * 200}, SamplingParams(max_tokens=4))
    sim.add_request("ok", {"prompt_token_ids": [5] * 8}, SamplingParams(max_tokens=4, ignore_eos=True))
    assert json.loads(LinearCostModel.zeros().to_json())["kind"] == "linear"
