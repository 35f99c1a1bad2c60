"""Logical-axis rules: ParamSpec logical axes -> the "tp" mesh axis, Megatron-style.

    logical axis   mesh axis   used by
    "q_heads"      "tp"        q_proj/q_bias output (column-parallel), o_proj input (row-parallel)
    "kv_heads"     "tp"        k_proj/v_proj/k_bias/v_bias output (column-parallel)
    "mlp"          "tp"        gate/up output (column-parallel), down_proj input (row-parallel)
    "vocab"        "tp"        embedding rows and LM head columns (vocabulary-parallel)
    "embed"        replicated  the residual stream stays whole on every device
    None           replicated  norm weights

Column-parallel layers need no communication (their input is replicated); each row-parallel
layer ends in a partial sum, so XLA inserts exactly one all-reduce after o_proj and one after
down_proj: two per layer. The vocab-parallel embedding is a masked local lookup + all-reduce,
and the LM head's sharded logits are gathered (or reduced) by the sampler.

KV heads when tp > num_kv_heads (vLLM's scheme). With r = tp // num_kv_heads replicas, the
k_proj/v_proj weights (and biases) are expanded at load time from num_kv_heads to tp heads by
repeating each head r times *in place* ([h0, h0, h1, h1] for nKV=2, tp=4): expanded head j is
original head j // r. The model then runs with `tp_model_config` (num_kv_heads = tp), which is
the same function: query head h of group size g' = num_heads / tp reads expanded head h // g',
i.e. original head (h // g') // r = h // (num_heads / num_kv_heads), exactly the original GQA
mapping. Sharding the expanded axis over "tp" leaves device d with one KV head, original head
d // r, which is the head its num_heads / tp query heads need; its KV cache slice
[num_blocks, block_size, 1, head_dim] holds only that head (memory per device as in vLLM,
where each rank's QKVParallelLinear loads kv head rank // r).
"""

from __future__ import annotations

import dataclasses

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxllm.parallel.mesh import TP_AXIS

LOGICAL_AXIS_RULES: dict = {
    "vocab": TP_AXIS,
    "q_heads": TP_AXIS,
    "kv_heads": TP_AXIS,
    "mlp": TP_AXIS,
    "embed": None,
    "head_dim": None,
    None: None,
}


def _is_spec(x) -> bool:
    from jaxllm.models.weights import ParamSpec

    return isinstance(x, ParamSpec)


def partition_spec(spec, mesh: Mesh, rules: dict = LOGICAL_AXIS_RULES) -> P:
    """PartitionSpec of one ParamSpec. A dimension whose size the mesh axis does not divide is
    replicated (only the vocabulary can get here after mesh.validate_tp)."""
    axes = []
    for size, logical in zip(spec.shape, spec.logical_axes):
        mesh_axis = rules[logical]
        if mesh_axis is not None and size % mesh.shape[mesh_axis]:
            mesh_axis = None
        axes.append(mesh_axis)
    return P(*axes)


def shardings_for(specs, mesh: Mesh, rules: dict = LOGICAL_AXIS_RULES):
    """Pytree of ParamSpec -> pytree (same structure) of NamedSharding."""
    return jax.tree.map(lambda sp: NamedSharding(mesh, partition_spec(sp, mesh, rules)), specs, is_leaf=_is_spec)


def kv_head_replicas(config, tensor_parallel_size: int) -> int:
    """How many devices hold each KV head: 1 if tp divides num_kv_heads, else tp // num_kv_heads."""
    nkv = config.num_kv_heads
    return 1 if nkv % tensor_parallel_size == 0 else tensor_parallel_size // nkv


def tp_model_config(config, tensor_parallel_size: int):
    """The ModelConfig the sharded model runs with: num_kv_heads raised to tp when tp > num_kv_heads
    (the KV heads replicated as described in the module docstring); otherwise `config` itself."""
    r = kv_head_replicas(config, tensor_parallel_size)
    if r == 1:
        return config
    return dataclasses.replace(config, num_kv_heads=config.num_kv_heads * r)


def canonical_rules(config, tensor_parallel_size: int) -> dict:
    """Rules for the *unexpanded* params (e.g. an orbax restore target): when KV heads will be
    replicated, the canonical k/v weights are restored replicated, then expanded (params.py)."""
    if kv_head_replicas(config, tensor_parallel_size) == 1:
        return LOGICAL_AXIS_RULES
    return dict(LOGICAL_AXIS_RULES, kv_heads=None)


def kv_cache_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of one K or V cache [num_blocks, block_size, num_kv_heads, head_dim]: over KV heads."""
    return NamedSharding(mesh, P(None, None, TP_AXIS, None))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())
