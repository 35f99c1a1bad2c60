"""Tensor parallelism (jax.sharding, Megatron-style) and multi-host launch.

    mesh = make_mesh(tensor_parallel_size)            # 1-D Mesh, axis "tp"
    validate_tp(model_config, tp)                      # what must divide what
    shardings = shardings_for(param_specs, mesh)       # pytree of NamedSharding, from ParamSpecs
    initialize()                                       # multi-host: jax.distributed + env vars

See rules.py for the sharding table and the KV-head replication scheme (tp > num_kv_heads).

Pipeline parallelism (pipeline.py, partition.py, pipeline_tick.py):

    mesh = make_pp_mesh(P, T)                          # [P, T] Mesh, axes ("pp", "tp")
    plan = validate_pp(model_config, P, T, partition)  # StagePlan: layers per stage
"""

from jaxllm.parallel.mesh import TP_AXIS, make_mesh, validate_tp
from jaxllm.parallel.partition import StagePlan
from jaxllm.parallel.pipeline import PP_AXIS, make_pp_mesh, validate_pp
from jaxllm.parallel.rules import (
    LOGICAL_AXIS_RULES,
    kv_cache_sharding,
    kv_head_replicas,
    partition_spec,
    replicated,
    shardings_for,
    tp_model_config,
)

__all__ = [
    "TP_AXIS", "make_mesh", "validate_tp", "LOGICAL_AXIS_RULES", "kv_cache_sharding", "kv_head_replicas",
    "partition_spec", "replicated", "shardings_for", "tp_model_config",
    "PP_AXIS", "StagePlan", "make_pp_mesh", "validate_pp",
]
