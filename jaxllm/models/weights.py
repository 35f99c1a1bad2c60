"""One ParamSpec per weight: the single source of truth for init, loading and sharding.

Logical axes: "vocab", "embed" (H), "q_heads" (nH*D), "kv_heads" (nKV*D), "mlp" (I), None.
Norm weights (attn/mlp/final norm [H], Gemma's post-attn/post-mlp norms [H], q/k norm [D]) use
(None,): they are tiny and every shard
needs the whole vector, so they are always replicated. Biases follow their projection's output
axis ("q_heads" / "kv_heads") so they shard with it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.models.model_config import ModelConfig


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    shape: tuple[int, ...]
    dtype: Any
    logical_axes: tuple[str | None, ...]


def _is_spec(x) -> bool:
    return isinstance(x, ParamSpec)


def param_specs(config: ModelConfig, dtype=jnp.float32) -> dict:
    """Pytree of ParamSpec with exactly the structure of the params pytree (see contracts)."""
    dtype = jnp.dtype(dtype)
    h, i, v = config.hidden_size, config.intermediate_size, config.vocab_size
    q, kv, d = config.q_size, config.kv_size, config.head_dim

    def s(shape, axes):
        return ParamSpec(tuple(shape), dtype, tuple(axes))

    layers = []
    for _ in range(config.num_layers):
        lp = {
            "attn_norm": s((h,), (None,)),
            "q_proj": s((h, q), ("embed", "q_heads")),
            "k_proj": s((h, kv), ("embed", "kv_heads")),
            "v_proj": s((h, kv), ("embed", "kv_heads")),
            "o_proj": s((q, h), ("q_heads", "embed")),
            "mlp_norm": s((h,), (None,)),
            "gate_proj": s((h, i), ("embed", "mlp")),
            "up_proj": s((h, i), ("embed", "mlp")),
            "down_proj": s((i, h), ("mlp", "embed")),
        }
        if config.attention_bias:
            lp["q_bias"] = s((q,), ("q_heads",))
            lp["k_bias"] = s((kv,), ("kv_heads",))
            lp["v_bias"] = s((kv,), ("kv_heads",))
        if config.qk_norm:
            lp["q_norm"] = s((d,), (None,))
            lp["k_norm"] = s((d,), (None,))
        if config.gemma_norms:
            lp["post_attn_norm"] = s((h,), (None,))
            lp["post_mlp_norm"] = s((h,), (None,))
        layers.append(lp)
    specs = {"embed": s((v, h), ("vocab", "embed")), "layers": layers, "final_norm": s((h,), (None,))}
    if not config.tie_word_embeddings:
        specs["lm_head"] = s((h, v), ("embed", "vocab"))
    return specs


def abstract_params(config: ModelConfig, dtype=jnp.float32, shardings=None) -> dict:
    """Pytree of jax.ShapeDtypeStruct (optionally with a matching pytree of shardings)."""
    specs = param_specs(config, dtype)
    if shardings is None:
        return jax.tree.map(lambda sp: jax.ShapeDtypeStruct(sp.shape, sp.dtype), specs, is_leaf=_is_spec)
    return jax.tree.map(
        lambda sp, sh: jax.ShapeDtypeStruct(sp.shape, sp.dtype, sharding=sh), specs, shardings, is_leaf=_is_spec
    )


def init_params(config: ModelConfig, key: jax.Array, dtype=jnp.float32) -> dict:
    """Random params: N(0, 0.02) matrices/biases, norm weights around 1 (so a dropped norm shows)."""
    specs = param_specs(config, dtype)
    leaves, treedef = jax.tree.flatten(specs, is_leaf=_is_spec)
    keys = jax.random.split(key, len(leaves))
    out = []
    for sp, k in zip(leaves, keys):
        noise = jax.random.normal(k, sp.shape, jnp.float32)
        if sp.logical_axes == (None,):  # norm weight
            out.append((1.0 + 0.1 * noise).astype(sp.dtype))
        else:
            out.append((0.02 * noise).astype(sp.dtype))
    return jax.tree.unflatten(treedef, out)


def hf_tensor_names(config: ModelConfig) -> dict:
    """Pytree with the params structure whose leaves are (hf_name, transpose: bool)."""
    layers = []
    for li in range(config.num_layers):
        p = f"model.layers.{li}."
        lp = {
            "attn_norm": (p + "input_layernorm.weight", False),
            "q_proj": (p + "self_attn.q_proj.weight", True),
            "k_proj": (p + "self_attn.k_proj.weight", True),
            "v_proj": (p + "self_attn.v_proj.weight", True),
            "o_proj": (p + "self_attn.o_proj.weight", True),
            # Llama's second norm is named post_attention_layernorm although it is the MLP's
            # pre-norm; Gemma 3 has a pre_feedforward_layernorm and uses that name for a real
            # post-attention norm.
            "mlp_norm": (p + ("pre_feedforward_layernorm" if config.gemma_norms else "post_attention_layernorm") + ".weight", False),
            "gate_proj": (p + "mlp.gate_proj.weight", True),
            "up_proj": (p + "mlp.up_proj.weight", True),
            "down_proj": (p + "mlp.down_proj.weight", True),
        }
        if config.attention_bias:
            lp["q_bias"] = (p + "self_attn.q_proj.bias", False)
            lp["k_bias"] = (p + "self_attn.k_proj.bias", False)
            lp["v_bias"] = (p + "self_attn.v_proj.bias", False)
        if config.qk_norm:
            lp["q_norm"] = (p + "self_attn.q_norm.weight", False)
            lp["k_norm"] = (p + "self_attn.k_norm.weight", False)
        if config.gemma_norms:
            lp["post_attn_norm"] = (p + "post_attention_layernorm.weight", False)
            lp["post_mlp_norm"] = (p + "post_feedforward_layernorm.weight", False)
        layers.append(lp)
    names = {"embed": ("model.embed_tokens.weight", False), "layers": layers, "final_norm": ("model.norm.weight", False)}
    if not config.tie_word_embeddings:
        names["lm_head"] = ("lm_head.weight", True)
    return names


def _default_place(spec: ParamSpec, array: np.ndarray) -> jax.Array:
    return jnp.asarray(array, dtype=spec.dtype)


def params_from_hf_tensors(
    config: ModelConfig,
    get_tensor: Callable[[str], np.ndarray],
    dtype=jnp.float32,
    place: Callable[[ParamSpec, np.ndarray], jax.Array] | None = None,
) -> dict:
    """Build the params pytree from HF-named tensors.

    get_tensor(name) returns the HF tensor (HF layout, e.g. q_proj.weight [nH*D, H]) as a numpy
    array and raises KeyError if it does not exist. Projection weights are transposed to [in, out].
    place(spec, array) puts one tensor on device (default: jnp.asarray in spec.dtype); tensor
    parallelism passes one that device_puts straight into the tensor's sharding.
    Raises ValueError naming the tensor for a missing tensor or a shape mismatch.
    With tied embeddings, an `lm_head.weight` in the checkpoint is ignored.
    """
    place = place or _default_place
    specs = param_specs(config, dtype)
    names = hf_tensor_names(config)

    def load(spec: ParamSpec, entry) -> jax.Array:
        name, transpose = entry
        try:
            arr = get_tensor(name)
        except KeyError:
            raise ValueError(f"checkpoint is missing tensor {name!r} (expected shape {_hf_shape(spec, transpose)})") from None
        arr = np.asarray(arr)
        expected = _hf_shape(spec, transpose)
        if tuple(arr.shape) != expected:
            raise ValueError(
                f"tensor {name!r} has shape {tuple(arr.shape)}, expected {expected} for {config.architecture}"
            )
        return place(spec, arr.T if transpose else arr)

    return jax.tree.map(load, specs, names, is_leaf=_is_spec)


def _hf_shape(spec: ParamSpec, transpose: bool) -> tuple[int, ...]:
    return tuple(reversed(spec.shape)) if transpose else spec.shape
