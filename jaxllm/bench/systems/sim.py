"""The simulator as a benchmark system: a SimulatedEngine (jaxllm/sim/) built with the config's
engine settings runs the same workload and arrivals through the same timed driver, on a virtual
clock. Host only: no jax, no weights (only the model's config.json is read).

Its numbers are predictions of the cost model chosen by `sim_cost_model` (a hardware profile
name from jaxllm.sim.hardware.PROFILES, or the path of a LinearCostModel JSON fitted with
jaxllm.sim.fit): a model, not a measurement. The result says so (SystemResult.kind).
"""

from __future__ import annotations

import os

from jaxllm.bench.driver import TimedDriver
from jaxllm.bench.systems import SystemResult, SystemUnavailable
from jaxllm.bench.systems.jaxllm_system import engine_kwargs, sampling_params


def cost_model(spec: str):
    """A profile name (kept as a string: SimulatedEngine builds its roofline) or a fitted JSON."""
    from jaxllm.sim.cost_model import LinearCostModel
    from jaxllm.sim.hardware import PROFILES

    if spec in PROFILES:
        return spec
    if spec.endswith(".json"):
        if not os.path.isfile(os.path.expanduser(spec)):
            raise ValueError(f"sim_cost_model: no such fitted cost model file {spec!r}")
        return LinearCostModel.load(os.path.expanduser(spec))
    raise ValueError(f"sim_cost_model must be a hardware profile ({sorted(PROFILES)}) or a fitted "
                     f"cost model .json, got {spec!r}")


def engine_config(model_dir: str, cfg, workload):
    """The EngineConfig LLM(model_dir, **engine_kwargs) would build (jaxllm/llm.py)."""
    from jaxllm.config import CacheConfig, EngineConfig, SchedulerConfig

    kw = engine_kwargs(cfg, workload)
    return EngineConfig(
        model=model_dir, dtype=kw["dtype"], seed=kw["seed"], attention_backend=kw["attention_backend"],
        matmul_backend=kw["matmul_backend"],
        cache=CacheConfig(**{k: kw[k] for k in ("block_size", "num_kv_blocks", "kv_cache_memory_bytes",
                                                 "enable_prefix_caching", "swap_space")}),
        scheduler=SchedulerConfig(**{k: kw[k] for k in ("max_num_seqs", "max_num_batched_tokens", "max_model_len",
                                                         "scheduling_policy", "enable_chunked_prefill",
                                                         "preemption_mode")}),
        token_buckets=kw["token_buckets"], skip_tokenizer_init=True)


def run_sim(model_dir: str, workload, arrivals, cfg) -> SystemResult:
    from jaxllm.sim.engine import SimulatedEngine
    from jaxllm.sim.hardware import MODEL_NOT_MEASUREMENT

    wcfg = cfg.workload
    if wcfg.beam_width:
        raise SystemUnavailable("sim: beam search workloads are not simulated (LLM.beam_search is not an Engine loop)")
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise SystemUnavailable(f"sim needs the model's transformers config.json; {model_dir!r} has none")
    sim = SimulatedEngine(engine_config(model_dir, cfg, workload), model_dir, cost_model(cfg.sim_cost_model))
    result = TimedDriver(sim).run([(spec, sampling_params(spec, wcfg)) for spec in workload.requests], arrivals)
    stats = sim.get_stats()
    info = dict(prediction=MODEL_NOT_MEASUREMENT, cost_model=cfg.sim_cost_model, warmup_s=0.0,
                simulated_time_s=result.duration, engine_stats=stats, block_size=cfg.engine.block_size,
                num_kv_blocks=sim.resolved.num_kv_blocks - 1, kv_cache_bytes=sim.resolved.kv_cache_bytes)
    return SystemResult("sim", result.request_table(), result.step_table(), result.duration, info, kind="predicted")
