"""What a step costs a model, in FLOPs and bytes: the numbers the cost models multiply.
Host only: reads a ModelConfig (or a transformers config.json / dict, without loading weights).

    costs = ModelCosts.from_config(model_config_from("path/to/hf_dir"), dtype="bfloat16")
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from jaxllm.models.model_config import ModelConfig

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


class _Attrs:
    """A config.json dict seen as the attribute object ModelConfig.from_hf reads (nested dicts too)."""

    def __init__(self, d: dict):
        for key, value in d.items():
            setattr(self, key, _Attrs(value) if key == "text_config" and isinstance(value, dict) else value)


def model_config_from(source: Any) -> ModelConfig:
    """A ModelConfig from a ModelConfig, a transformers config (object or dict), or a directory /
    config.json path. No weights are read and transformers is not imported."""
    if isinstance(source, ModelConfig):
        return source
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        path = os.path.join(path, "config.json") if os.path.isdir(path) else path
        if not os.path.exists(path):
            raise ValueError(f"no transformers config at {path!r}")
        with open(path) as f:
            source = json.load(f)
    if isinstance(source, dict):
        source = _Attrs(source)
    return ModelConfig.from_hf(source)


@dataclasses.dataclass(frozen=True)
class ModelCosts:
    """Per-token and per-row costs of one model (all counts, not times).

    matmul_params: weights of the decoder layers' matmuls (q, k, v, o, gate, up, down): every token
      of a step multiplies by all of them (2 FLOPs per weight).
    lm_head_params: V x H, applied to one token per batch row (the one it samples from).
    weight_bytes: what a step streams from memory at least once (layer matmuls + LM head).
    kv_bytes_per_token: K and V of one token over all layers.
    attention_flops_per_pair: QK^T and PV for one (query, key) pair over all layers (4 nH D L).
    """

    matmul_params: int
    lm_head_params: int
    hidden_size: int
    num_layers: int
    dtype_bytes: int
    kv_bytes_per_token: int
    attention_flops_per_pair: int

    @classmethod
    def from_config(cls, config: ModelConfig, dtype: str = "float32") -> "ModelCosts":
        if dtype not in DTYPE_BYTES:
            raise ValueError(f"dtype must be one of {sorted(DTYPE_BYTES)}, got {dtype!r}")
        b = DTYPE_BYTES[dtype]
        h, L = config.hidden_size, config.num_layers
        per_layer = h * config.q_size + 2 * h * config.kv_size + config.q_size * h + 3 * h * config.intermediate_size
        return cls(
            matmul_params=L * per_layer,
            lm_head_params=config.vocab_size * h,
            hidden_size=h,
            num_layers=L,
            dtype_bytes=b,
            kv_bytes_per_token=2 * L * config.kv_size * b,
            attention_flops_per_pair=4 * config.num_heads * config.head_dim * L,
        )

    @property
    def weight_bytes(self) -> int:
        return (self.matmul_params + self.lm_head_params) * self.dtype_bytes
