"""jaxllm.bench: the research harness (configs, workloads, arrivals, a timed driver, systems,
metrics as pandas DataFrames, results on disk, sweeps, plots). Host code: jax is imported only
by the jaxllm system (through LLM) and the roofline measurement.

    from jaxllm.bench import BenchConfig, EngineArgs, WorkloadConfig, run_benchmark, sweep, load_run
    cfg = BenchConfig(model="random:tiny", workload=WorkloadConfig(num_prompts=16, request_rate=4.0))
    run = run_benchmark(cfg)           # run.requests / run.steps: DataFrames; run.summary: dict
    table = sweep(cfg, {"scheduling_policy": ["fcfs", "sjf"], "request_rate": [2.0, 8.0]})

Command line: `jaxllm bench {throughput,latency,sweep,serve}` (jaxllm/bench/cli.py). The system
"sim" is jaxllm.sim's SimulatedEngine on the same workload and driver: predictions, labelled so.
"""

from jaxllm.bench.arrivals import arrival_times, replay
from jaxllm.bench.config import BenchConfig, EngineArgs, WorkloadConfig, from_dict, load_toml
from jaxllm.bench.driver import TimedDriver
from jaxllm.bench.metrics import request_table, step_table, summarize
from jaxllm.bench.results import Run, load_run
from jaxllm.bench.run import run_benchmark
from jaxllm.bench.sweep import sweep
from jaxllm.bench.workloads import LengthDist, RequestSpec, Workload, lengths_workload, make_workload

__all__ = ["BenchConfig", "EngineArgs", "WorkloadConfig", "from_dict", "load_toml", "arrival_times", "replay",
           "TimedDriver", "request_table", "step_table", "summarize", "Run", "load_run", "run_benchmark",
           "sweep", "LengthDist", "RequestSpec", "Workload", "lengths_workload", "make_workload"]
