"""What the engine and runner call for tensor parallelism (kept here so their diffs stay small).

    mesh, model = load_for_engine(engine_config, model=None)   # params straight into shardings
    config, params = shard(model, mesh)                        # idempotent for a sharded model
    attention_fn = wrap_attention(attention_fn, backend, mesh)
    jit_kwargs = jit_shardings(mesh, num_layers)
    args = to_global(mesh, args)                               # host numpy -> global replicated
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh

from jaxllm.parallel.mesh import make_mesh, validate_tp
from jaxllm.parallel.params import load_sharded, shard_model
from jaxllm.parallel.rules import kv_cache_sharding, replicated


def load_for_engine(config, model=None):
    """(mesh, Model sharded over it) for an EngineConfig with tensor_parallel_size > 1.

    `model`: an already loaded Model (its params are resharded), or None to load config.model
    straight into the shardings. The returned Model's config is rules.tp_model_config(...).
    """
    import os

    tp = config.parallel.tensor_parallel_size
    # Check the model against tp before the devices, so a bad tp names the model's numbers even
    # on a machine with too few devices.
    if model is not None:
        validate_tp(model.config, tp)
    elif os.path.isdir(config.model) and os.path.exists(os.path.join(config.model, "config.json")):
        from jaxllm.models.loader import load_config

        validate_tp(load_config(config.model), tp)
    mesh = make_mesh(tp)
    if model is not None:
        return mesh, shard_model(model, mesh)
    return mesh, load_sharded(config.model, config.dtype, mesh)


def shard(model, mesh: Mesh):
    """(config, params) of `model` placed on `mesh` (no copy when already there)."""
    sharded = shard_model(model, mesh)
    return sharded.config, sharded.params


def wrap_attention(attention_fn, backend: str, mesh: Mesh):
    """The reference attention is jnp: GSPMD partitions it over heads by itself. A Pallas kernel
    or the CPU kernel's custom call is opaque to GSPMD, so it runs per device under shard_map."""
    if backend in ("pallas", "cpu") and mesh.devices.size > 1:
        from jaxllm.parallel.attention import shard_map_attention

        return shard_map_attention(attention_fn, mesh)
    return attention_fn


def jit_shardings(mesh: Mesh, num_layers: int) -> dict:
    """jax.jit kwargs for the engine step (params, kv_caches, ...) -> (SamplerOutput, kv_caches):
    sampler outputs replicated (every host reads them), KV caches stay sharded over KV heads.
    Input shardings come from the arguments (params committed to their shardings, the rest made
    replicated by `to_global`)."""
    kv = kv_cache_sharding(mesh)
    return {"out_shardings": (replicated(mesh), [(kv, kv)] * num_layers)}


def to_global(mesh: Mesh, tree):
    """Host numpy arrays -> global arrays replicated over the mesh. Every process passes the same
    values (identical scheduler decisions), each builds only its own devices' copies; this is what
    makes multi-host work, where a process cannot device_put onto another host's devices."""
    sharding = replicated(mesh)

    def one(x):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])

    return jax.tree.map(one, tree)
