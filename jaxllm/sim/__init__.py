"""jaxllm.sim: the real scheduler, policies and KV-cache manager on a virtual clock, with a
step-cost model in place of the device. Host only: nothing here imports jax, except
jaxllm.sim.fit (the optax fit of a LinearCostModel), which is not imported by this package.

    SimulatedEngine     an Engine without a device (jaxllm/sim/engine.py)
    LinearCostModel     time = coefficients . roofline features, fitted to recorded steps
    HardwareProfile     peak FLOP/s, bandwidth, overhead, devices -> a model, not a measurement
    replay              re-run a recorded run's arrivals; decisions match step for step

Workloads, arrivals, the timed loop and the metrics are jaxllm.bench's (one loop for a real Engine
and a SimulatedEngine: the driver waits with the simulator's `advance_to`):

    from jaxllm.bench import TimedDriver, arrival_times
    from jaxllm.bench.workloads import lengths_workload
    run = TimedDriver(sim).run(lengths_workload(prompt_lens, output_lens, vocab), arrival_times(n, rate))
    run.summary(); replay(run.requests, run.steps, config, model)

In the harness the simulator is the system "sim" (`jaxllm bench ... --systems jaxllm,sim`).
"""

from jaxllm.sim.clock import VirtualClock
from jaxllm.sim.cost_model import FEATURES, PARTS, LinearCostModel, StepShape, StepTime, step_features, step_table
from jaxllm.sim.engine import SimulatedEngine
from jaxllm.sim.hardware import MODEL_NOT_MEASUREMENT, PROFILES, HardwareProfile, RooflineCostModel, get_profile
from jaxllm.sim.model_costs import ModelCosts, model_config_from
from jaxllm.sim.replay import ReplayResult, replay

__all__ = [
    "VirtualClock", "FEATURES", "PARTS", "LinearCostModel", "StepShape", "StepTime", "step_features", "step_table",
    "SimulatedEngine", "MODEL_NOT_MEASUREMENT", "PROFILES", "HardwareProfile", "RooflineCostModel", "get_profile",
    "ModelCosts", "model_config_from", "ReplayResult", "replay",
]
