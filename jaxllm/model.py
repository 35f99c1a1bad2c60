"""Model: a loaded checkpoint (config + params) with a dense reference forward and orbax save/restore.

`Model.forward` is the no-cache reference (full causal attention over the given tokens); the engine
uses llama.forward with a paged attention callable instead.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any

import jax
import jax.numpy as jnp

from jaxllm.attention.dense import make_dense_attention
from jaxllm.models import packed, registry, weights
from jaxllm.models.model_config import ModelConfig, RopeConfig

_CONFIG_FILE = "jaxllm_config.json"
_PARAMS_DIR = "params"


@functools.partial(jax.jit, static_argnums=(1,))
def _dense_logits(params: dict, config: ModelConfig, token_ids: jax.Array) -> jax.Array:
    """token_ids [T] int32 -> logits [T, V] f32 (positions 0..T-1). Compiled once per (config, T)."""
    module = registry.get_model_module(config.architecture)
    positions = jnp.arange(token_ids.shape[0], dtype=jnp.int32)
    hidden, _ = module.forward(params, config, token_ids, positions, None, make_dense_attention(config, positions))
    return module.compute_logits(params, config, hidden)


@dataclasses.dataclass(frozen=True, eq=False)
class Model:
    config: ModelConfig
    params: dict  # pytree as described by weights.param_specs
    dtype: str  # "float32" | "bfloat16"
    path: str | None = None

    def forward(self, token_ids) -> jax.Array:
        """token_ids [T] int (sequence starting at position 0) -> logits [T, V] float32."""
        token_ids = jnp.asarray(token_ids, dtype=jnp.int32)
        return _dense_logits(self.params, self.config, token_ids)

    def save(self, directory: str) -> None:
        """Write params (orbax) and the config (json) under `directory` (created; must not exist)."""
        import orbax.checkpoint as ocp

        directory = os.path.abspath(os.fspath(directory))
        os.makedirs(directory, exist_ok=True)
        with ocp.StandardCheckpointer() as ckptr:  # unpacked: a checkpoint never holds PackedWeights
            ckptr.save(os.path.join(directory, _PARAMS_DIR), packed.unpack_params(self.params))
        meta = {"config": dataclasses.asdict(self.config), "dtype": self.dtype, "path": self.path}
        with open(os.path.join(directory, _CONFIG_FILE), "w") as f:
            json.dump(meta, f, indent=1)

    @classmethod
    def restore(cls, directory: str, shardings: Any = None) -> "Model":
        """Read a Model written by `save`.

        shardings: optional pytree of jax.sharding.Sharding with the params structure; each array
        is then restored straight into its sharding (for tensor parallelism).
        """
        import orbax.checkpoint as ocp

        directory = os.path.abspath(os.fspath(directory))
        with open(os.path.join(directory, _CONFIG_FILE)) as f:
            meta = json.load(f)
        config = config_from_dict(meta["config"])
        target = weights.abstract_params(config, jnp.dtype(meta["dtype"]), shardings)
        with ocp.StandardCheckpointer() as ckptr:
            params = ckptr.restore(os.path.join(directory, _PARAMS_DIR), target)
        return cls(config=config, params=params, dtype=meta["dtype"], path=meta.get("path"))


def config_from_dict(d: dict) -> ModelConfig:
    """Inverse of dataclasses.asdict(ModelConfig): json turns tuples into lists, undo that."""
    d = dict(d)
    d["rope"] = RopeConfig(**d["rope"])
    if d.get("rope_local") is not None:
        d["rope_local"] = RopeConfig(**d["rope_local"])
    d["layer_sliding_windows"] = tuple(d["layer_sliding_windows"])
    d["eos_token_ids"] = tuple(d["eos_token_ids"])
    return ModelConfig(**d)
