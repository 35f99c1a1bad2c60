"""The device mesh for tensor parallelism, and the divisibility rules a TP size must obey.

One mesh axis, "tp", over N devices (all processes' devices in a multi-host run; jax.devices()
is global). What must divide what (checked by `validate_tp`, each error names both values):

* num_heads % N == 0: each device owns num_heads / N whole query heads (q_proj's output columns,
  o_proj's input rows).
* num_kv_heads % N == 0 (each device owns num_kv_heads / N KV heads) **or** N % num_kv_heads == 0
  (N > num_kv_heads: each KV head is replicated on N / num_kv_heads devices, as in vLLM; see
  rules.kv_head_replicas). Anything else would split a KV head across devices.
* intermediate_size % N == 0: gate/up output columns and down_proj input rows.
* Multi-host: the mesh must include devices of every process (use tp = jax.device_count()).
* vocab_size need NOT divide: the embedding / LM head are vocabulary-parallel when it does, and
  replicated when it does not (an uneven split would need a padded vocabulary; replicating costs
  memory, never correctness). hidden_size is never sharded.
"""

from __future__ import annotations

import numpy as np
import jax
from jax.sharding import AxisType, Mesh

TP_AXIS = "tp"


def make_mesh(tensor_parallel_size: int, devices=None) -> Mesh:
    """A 1-D Mesh named ("tp",) over the first `tensor_parallel_size` devices.

    devices: default jax.devices() (global across processes). Raises ValueError when the size is not
    a positive int or exceeds the devices available (naming both).
    """
    n = tensor_parallel_size
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"tensor_parallel_size must be a positive int, got {n!r}")
    chosen = pick_devices(n, f"tensor_parallel_size={n}", devices)
    # Auto axis types: GSPMD propagates shardings from the parameters and inserts the collectives
    # (jax.make_mesh would default to Explicit sharding, which needs per-op annotations).
    return Mesh(np.asarray(chosen), (TP_AXIS,), axis_types=(AxisType.Auto,))


def pick_devices(n: int, what: str, devices=None) -> list:
    """The first n devices (default jax.devices(), global), refusing too few devices or a choice
    that leaves out a process; `what` names the sizes in the error (e.g. "tensor_parallel_size=4")."""
    devices = list(jax.devices() if devices is None else devices)
    if n > len(devices):
        raise ValueError(
            f"{what} exceeds the {len(devices)} available device(s) "
            f"({devices[0].platform if devices else 'none'}); on CPU, fake more with "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={n} (set before jax is imported)"
        )
    chosen = devices[:n]
    missing = sorted({d.process_index for d in devices} - {d.process_index for d in chosen})
    if missing:
        # Every process runs the same step and must own part of the mesh to read its outputs.
        raise ValueError(
            f"{what} uses devices of processes {sorted({d.process_index for d in chosen})} "
            f"only, but processes {missing} also run; in a multi-host run use all {len(devices)} devices"
        )
    return chosen


def validate_tp(config, tensor_parallel_size: int) -> None:
    """Raise ValueError if `tensor_parallel_size` cannot shard this ModelConfig (see module docstring)."""
    n = tensor_parallel_size
    if config.num_heads % n:
        raise ValueError(
            f"tensor_parallel_size={n} does not divide num_heads={config.num_heads}: each device must "
            f"hold whole query heads"
        )
    nkv = config.num_kv_heads
    if nkv % n and n % nkv:
        raise ValueError(
            f"tensor_parallel_size={n} and num_kv_heads={nkv}: one must divide the other (KV heads are "
            f"split over devices when tp divides them, replicated tp/num_kv_heads times when "
            f"num_kv_heads divides tp)"
        )
    if config.intermediate_size % n:
        raise ValueError(
            f"tensor_parallel_size={n} does not divide intermediate_size={config.intermediate_size}"
        )
