"""ModelConfig: the architecture facts the forward pass needs, read from a transformers config.

One frozen (hashable) dataclass covers Llama, Mistral, Qwen2 and Qwen3: the differences between
them are fields (qkv bias, q/k norm, sliding window, RoPE scaling), not separate model classes.
Being frozen and hashable, it is passed to jitted functions as a static argument.
"""

from __future__ import annotations

import dataclasses
from typing import Any

SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
)


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters. `rope_type` is "default" or "llama3"."""

    theta: float = 10000.0
    rope_type: str = "default"
    # llama3 scaling only (see transformers' _compute_llama3_parameters).
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Static description of a decoder-only Llama-family model.

    `layer_sliding_windows[i]` is the attention window of layer i in tokens (a query at position p
    sees keys at positions > p - window), or None for full causal attention.
    """

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope: RopeConfig
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool  # bias on q/k/v projections (Qwen2); o_proj never has one here
    qk_norm: bool  # per-head RMSNorm on q and k before RoPE (Qwen3)
    layer_sliding_windows: tuple[int | None, ...]
    hidden_act: str = "silu"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"unsupported architecture {self.architecture!r}; supported: "
                f"{', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        if self.num_heads % self.num_kv_heads != 0:
            raise ValueError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if len(self.layer_sliding_windows) != self.num_layers:
            raise ValueError(
                f"layer_sliding_windows has {len(self.layer_sliding_windows)} entries, "
                f"expected num_layers={self.num_layers}"
            )
        if self.hidden_act != "silu":
            raise ValueError(f"unsupported hidden_act {self.hidden_act!r}; only 'silu' is implemented")
        if self.rope.rope_type not in ("default", "llama3"):
            raise ValueError(
                f"unsupported rope_type {self.rope.rope_type!r}; supported: 'default', 'llama3'"
            )

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @classmethod
    def from_hf(cls, hf_config: Any) -> "ModelConfig":
        """Build from a transformers PretrainedConfig (any of SUPPORTED_ARCHITECTURES)."""
        archs = list(getattr(hf_config, "architectures", None) or [])
        if not archs:
            # Configs built in code (not loaded) may lack `architectures`; infer from model_type.
            by_type = {
                "llama": "LlamaForCausalLM",
                "mistral": "MistralForCausalLM",
                "qwen2": "Qwen2ForCausalLM",
                "qwen3": "Qwen3ForCausalLM",
            }
            model_type = getattr(hf_config, "model_type", None)
            if model_type not in by_type:
                raise ValueError(
                    f"config has no `architectures` and unsupported model_type {model_type!r}; "
                    f"supported architectures: {', '.join(SUPPORTED_ARCHITECTURES)}"
                )
            archs = [by_type[model_type]]
        arch = archs[0]
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"unsupported architecture {arch!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        num_heads = hf_config.num_attention_heads
        num_kv_heads = getattr(hf_config, "num_key_value_heads", None) or num_heads
        head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // num_heads
        num_layers = hf_config.num_hidden_layers
        if getattr(hf_config, "mlp_bias", False):
            raise ValueError("mlp_bias=True is not supported")
        return cls(
            architecture=arch,
            vocab_size=hf_config.vocab_size,
            hidden_size=hf_config.hidden_size,
            intermediate_size=hf_config.intermediate_size,
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            rms_norm_eps=float(hf_config.rms_norm_eps),
            rope=_rope_from_hf(hf_config),
            max_position_embeddings=int(getattr(hf_config, "max_position_embeddings", 2048)),
            tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
            attention_bias=arch == "Qwen2ForCausalLM" or bool(getattr(hf_config, "attention_bias", False)),
            qk_norm=arch == "Qwen3ForCausalLM",
            layer_sliding_windows=_sliding_windows_from_hf(hf_config, arch, num_layers),
            hidden_act=getattr(hf_config, "hidden_act", "silu"),
            bos_token_id=getattr(hf_config, "bos_token_id", None),
            eos_token_ids=_as_tuple(getattr(hf_config, "eos_token_id", None)),
        )


def _as_tuple(x) -> tuple[int, ...]:
    if x is None:
        return ()
    if isinstance(x, (list, tuple)):
        return tuple(int(i) for i in x)
    return (int(x),)


def _rope_from_hf(hf_config) -> RopeConfig:
    # transformers >= 4.56 / 5.x keep everything in `rope_parameters`; older configs used
    # `rope_theta` + `rope_scaling`. Read both.
    params = dict(getattr(hf_config, "rope_parameters", None) or {})
    scaling = getattr(hf_config, "rope_scaling", None) or {}
    for key, value in dict(scaling).items():
        params.setdefault(key, value)
    theta = params.get("rope_theta", getattr(hf_config, "rope_theta", None) or 10000.0)
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    if rope_type == "llama3":
        return RopeConfig(
            theta=float(theta),
            rope_type="llama3",
            factor=float(params["factor"]),
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_position_embeddings=int(params["original_max_position_embeddings"]),
        )
    if rope_type != "default":
        raise ValueError(f"unsupported rope_type {rope_type!r}; supported: 'default', 'llama3'")
    return RopeConfig(theta=float(theta))


def _sliding_windows_from_hf(hf_config, arch: str, num_layers: int) -> tuple[int | None, ...]:
    window = getattr(hf_config, "sliding_window", None)
    if arch == "MistralForCausalLM" or arch == "LlamaForCausalLM":
        return (window,) * num_layers if window else (None,) * num_layers
    # Qwen2/Qwen3: the window applies only when use_sliding_window is set, and only to the layers
    # transformers marks as "sliding_attention" in layer_types.
    if not getattr(hf_config, "use_sliding_window", False) or not window:
        return (None,) * num_layers
    layer_types = getattr(hf_config, "layer_types", None)
    if layer_types is None:
        max_window_layers = getattr(hf_config, "max_window_layers", num_layers)
        layer_types = [
            "sliding_attention" if i >= max_window_layers else "full_attention"
            for i in range(num_layers)
        ]
    return tuple(window if t == "sliding_attention" else None for t in layer_types)
