"""Putting parameters into their tensor-parallel shardings: at load, from a loaded Model, or
from an orbax checkpoint written with any mesh shape.

Every array is built with jax.make_array_from_callback, so each process materialises only the
shards of its own devices; the same code runs single-host and multi-host (where jax.device_put
of a host array onto other processes' devices is not possible).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from jaxllm.models import weights
from jaxllm.parallel.mesh import validate_tp
from jaxllm.parallel.rules import (
    canonical_rules,
    kv_head_replicas,
    shardings_for,
    tp_model_config,
)

_KV_LEAVES = ("k_proj", "v_proj", "k_bias", "v_bias")


def expand_kv_heads(array: np.ndarray, axis: int, head_dim: int, replicas: int) -> np.ndarray:
    """Repeat each KV head `replicas` times in place along `axis` (size nKV*D -> nKV*replicas*D).

    [H, nKV*D] -> [H, nKV*r*D] for k_proj/v_proj (axis=1), [nKV*D] -> [nKV*r*D] for biases (axis=0).
    Head order: [h0]*r + [h1]*r + ... (see rules.py for why this keeps the GQA mapping).
    """
    if replicas == 1:
        return array
    shape = array.shape
    nkv = shape[axis] // head_dim
    split = shape[:axis] + (nkv, head_dim) + shape[axis + 1 :]
    out = np.repeat(np.asarray(array).reshape(split), replicas, axis=axis)
    return out.reshape(shape[:axis] + (nkv * replicas * head_dim,) + shape[axis + 1 :])


def _put(array: np.ndarray, sharding) -> jax.Array:
    array = np.asarray(array)
    return jax.make_array_from_callback(array.shape, sharding, lambda idx: array[idx])


def make_place(config, mesh: Mesh, dtype):
    """The `place(spec, np_array)` hook for weights.params_from_hf_tensors: expands KV heads when
    tp > num_kv_heads and builds the array directly in its sharding (no full copy on one device)."""
    tp = mesh.devices.size
    r = kv_head_replicas(config, tp)
    tp_specs = weights.param_specs(tp_model_config(config, tp), dtype)
    tp_shardings = shardings_for(tp_specs, mesh)
    # The hook sees only the ParamSpec, so look the target sharding up by (shape, axes) of the
    # canonical spec; all weights with the same canonical spec share a sharding.
    canon = weights.param_specs(config, dtype)
    by_spec = {}
    for sp, sh in zip(*(jax.tree.leaves(t, is_leaf=_is_leaf) for t in (canon, tp_shardings))):
        by_spec[(sp.shape, sp.logical_axes)] = sh

    def place(spec, array):
        sharding = by_spec[(spec.shape, spec.logical_axes)]
        if "kv_heads" in spec.logical_axes:
            array = expand_kv_heads(array, spec.logical_axes.index("kv_heads"), config.head_dim, r)
        return _put(np.asarray(array).astype(spec.dtype), sharding)

    return place


def _is_leaf(x) -> bool:
    return isinstance(x, (weights.ParamSpec, jax.sharding.Sharding))


def shard_params(params: dict, config, mesh: Mesh) -> dict:
    """Place an already-loaded params pytree (canonical, or already expanded for this tp) into the
    tp shardings. Leaves already in their target sharding are kept as they are (no copy)."""
    tp = mesh.devices.size
    validate_tp(config, tp)
    r = kv_head_replicas(config, tp)
    target = shardings_for(weights.param_specs(tp_model_config(config, tp)), mesh)

    def one(path, leaf, sharding):
        name = getattr(path[-1], "key", None)
        if name in _KV_LEAVES and r > 1:
            return _put(expand_kv_heads(np.asarray(leaf), leaf.ndim - 1, config.head_dim, r).astype(leaf.dtype), sharding)
        if isinstance(leaf, jax.Array) and leaf.sharding == sharding:
            return leaf
        if jax.process_count() == 1:
            return jax.device_put(leaf, sharding)
        return _put(np.asarray(leaf), sharding)

    return jax.tree_util.tree_map_with_path(one, params, target, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))


def shard_model(model, mesh: Mesh):
    """A Model whose params are in the tp shardings and whose config is tp_model_config(...)."""
    tp = mesh.devices.size
    params = shard_params(model.params, model.config, mesh)
    return dataclasses.replace(model, config=tp_model_config(model.config, tp), params=params)


def load_sharded(path: str, dtype: str, mesh: Mesh):
    """Load a checkpoint straight into the tp shardings (HF safetensors dirs: tensor by tensor via
    the place hook; other formats, e.g. GGUF: loaded, then resharded)."""
    import os

    from jaxllm.model import Model
    from jaxllm.models.loader import load_config, load_model

    tp = mesh.devices.size
    if os.path.isdir(path) and os.path.exists(os.path.join(path, "config.json")):
        config = load_config(path)
        validate_tp(config, tp)
        model = load_model(path, dtype=dtype, place=make_place(config, mesh, jnp.dtype(dtype)))
        return Model(config=tp_model_config(config, tp), params=model.params, dtype=model.dtype, path=model.path)
    return shard_model(load_model(path, dtype=dtype), mesh)


def restore_sharded(directory: str, mesh: Mesh):
    """Restore a `Model.save` checkpoint (written from any mesh shape, or none) into this mesh.

    Orbax reads each array straight into its target sharding. When tp > num_kv_heads, the saved
    (canonical) k/v weights are restored replicated and then expanded; everything else lands in
    its final sharding directly.
    """
    import json
    import os

    from jaxllm.model import _CONFIG_FILE, Model, config_from_dict

    tp = mesh.devices.size
    with open(os.path.join(os.path.abspath(directory), _CONFIG_FILE)) as f:
        meta = json.load(f)
    config = config_from_dict(meta["config"])
    validate_tp(config, tp)
    shardings = shardings_for(weights.param_specs(config, jnp.dtype(meta["dtype"])), mesh, canonical_rules(config, tp))
    model = Model.restore(directory, shardings=shardings)
    return shard_model(model, mesh)
