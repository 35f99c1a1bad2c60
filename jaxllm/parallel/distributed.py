"""Multi-host launch: one jaxllm process per host, all running the same program.

Every process runs the same engine loop on the same requests with the same seeds, so the
(host-side, deterministic) scheduler makes identical decisions everywhere; each step's inputs are
host-local numpy arrays turned into global replicated arrays, the jitted step runs SPMD over the
global mesh (jax.devices() spans all hosts), and the sampled tokens come back replicated to every
host. Hence `LLM.generate` returns the full, identical outputs on every process; write results
from one of them only (`is_main_process()`).

Launch recipe
-------------
Call `jaxllm.parallel.initialize()` first thing, before any other jax call, then build the LLM
with tensor_parallel_size = the total number of devices (jax.device_count()):

    from jaxllm.parallel import distributed
    distributed.initialize()
    llm = LLM(model=path, tensor_parallel_size=jax.device_count())
    outs = llm.generate(prompts, params)
    if distributed.is_main_process():
        write(outs)

* TPU pod slice (e.g. v5e-16, 4 hosts): run the same command on every host (e.g.
  `gcloud compute tpus tpu-vm ssh NAME --worker=all --command="python run.py"`). No arguments are
  needed: jax detects the coordinator, process count and id from the TPU metadata.
* GPU cluster under SLURM: `srun --nodes=2 --ntasks-per-node=1 --gpus-per-task=8 python run.py`;
  jax reads SLURM_* variables (one process per node; with one process per GPU, use
  --ntasks-per-node=8 and jax assigns each task its local GPU).
* Anything else (plain ssh, Kubernetes, CPU hosts): set on every process
      JAXLLM_COORDINATOR=host0:1234  JAXLLM_NUM_PROCESSES=2  JAXLLM_PROCESS_ID=<0..N-1>
  (or pass initialize(coordinator_address=..., num_processes=..., process_id=...)). Process 0
  runs the coordinator service on that port; the others connect to it.
* CPU (testing): collectives between processes use gloo; `initialize` selects it. Add
  XLA_FLAGS=--xla_force_host_platform_device_count=K for K devices per process.

Arguments win over JAXLLM_* variables, which win over jax's own cluster auto-detection.
"""

from __future__ import annotations

import os

import jax

ENV_COORDINATOR = "JAXLLM_COORDINATOR"
ENV_NUM_PROCESSES = "JAXLLM_NUM_PROCESSES"
ENV_PROCESS_ID = "JAXLLM_PROCESS_ID"


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an int, got {value!r}") from None


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, local_device_ids=None,
               cpu_collectives: str = "gloo", **kwargs) -> None:
    """Join the multi-process jax runtime (wraps jax.distributed.initialize).

    Must run before anything touches a jax backend. Missing arguments are read from
    JAXLLM_COORDINATOR / JAXLLM_NUM_PROCESSES / JAXLLM_PROCESS_ID; still missing ones are left to
    jax's auto-detection (TPU pods, SLURM, Open MPI). Extra kwargs go to jax.distributed.initialize.
    Raises ValueError for an inconsistent set (e.g. a process_id outside [0, num_processes)).
    """
    coordinator_address = coordinator_address or os.environ.get(ENV_COORDINATOR) or None
    num_processes = num_processes if num_processes is not None else _env_int(ENV_NUM_PROCESSES)
    process_id = process_id if process_id is not None else _env_int(ENV_PROCESS_ID)
    if num_processes is not None and num_processes < 1:
        raise ValueError(f"num_processes must be >= 1, got {num_processes}")
    if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
        raise ValueError(f"process_id={process_id} is outside [0, num_processes={num_processes})")
    # CPU devices talk through gloo (the default on recent jax, set explicitly so an older default
    # or a user override does not leave cross-process collectives unimplemented). Harmless on
    # TPU/GPU, where the platform's own collectives are used.
    jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        local_device_ids=local_device_ids,
        **kwargs,
    )


def is_main_process() -> bool:
    """True on process 0 (the one that should write results)."""
    return jax.process_index() == 0


def shutdown() -> None:
    jax.distributed.shutdown()
