"""The systems a benchmark compares, one module each, all returning a SystemResult:

  jaxllm         this engine, driven by the timed driver (any arrival process)
  hf_static      transformers `generate` in static batches (offline only)
  hf_continuous  transformers continuous batching (`init_continuous_batching`; offline only)
  vllm           vLLM in its own venv and process (jaxllm/bench/peers/vllm_worker.py; offline only)
  sim            jaxllm.sim's SimulatedEngine on a virtual clock, cost model `sim_cost_model`:
                 predictions (a model, not a measurement), same driver, any arrival process

A system that cannot run a workload raises SystemUnavailable (recorded as skipped, with why);
any other exception is recorded as the system's error and the run goes on.
"""

from __future__ import annotations

import dataclasses

import pandas as pd


class SystemUnavailable(RuntimeError):
    """The system can't run here or can't run this workload (the message says why)."""


@dataclasses.dataclass
class SystemResult:
    name: str
    requests: pd.DataFrame  # metrics.request_table rows (times relative to the run's start)
    steps: pd.DataFrame | None  # metrics.step_table rows, for systems that report steps
    duration: float  # seconds of the timed run (warm-up and compilation excluded)
    info: dict  # system-specific facts: warm-up / compile time, its config, engine stats
    kind: str = "measured"  # or "predicted": a model's numbers (the simulator), labelled so everywhere


# name -> "module:function" of its run function; `register_system` adds one (a simulator, a
# new peer) without editing this file.
RUNNERS: dict[str, str] = {
    "jaxllm": "jaxllm.bench.systems.jaxllm_system:run_jaxllm",
    "hf_static": "jaxllm.bench.systems.hf:run_hf_static",
    "hf_continuous": "jaxllm.bench.systems.hf:run_hf_continuous",
    "vllm": "jaxllm.bench.systems.vllm:run_vllm",
    "sim": "jaxllm.bench.systems.sim:run_sim",
}


def register_system(name: str, target: str) -> None:
    """Make `name` a system configs may list; target: "module:function" with the signature
    fn(model_dir, workload, arrivals, cfg) -> SystemResult (imported only when it runs)."""
    if ":" not in target:
        raise ValueError(f"system target must be 'module:function', got {target!r}")
    RUNNERS[name] = target


def get_system(name: str):
    """The run function of a system: fn(model_dir, workload, arrivals, cfg) -> SystemResult."""
    if name not in RUNNERS:
        raise ValueError(f"unknown system {name!r}; choose from {sorted(RUNNERS)}")
    import importlib

    module, fn = RUNNERS[name].split(":")
    return getattr(importlib.import_module(module), fn)


def require_offline(name: str, workload_cfg, sharing: bool = False) -> None:
    """sharing: the system also runs n > 1 and beam-search requests."""
    if not workload_cfg.offline:
        raise SystemUnavailable(f"{name} runs offline workloads only (request_rate=inf, no trace replay)")
    if not sharing and (workload_cfg.n > 1 or workload_cfg.beam_width):
        raise SystemUnavailable(f"{name} runs n=1 sampling requests only in this harness")
