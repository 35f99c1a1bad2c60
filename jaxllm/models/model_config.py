"""ModelConfig: the architecture facts the forward pass needs, read from a transformers config.

One frozen (hashable) dataclass covers Llama, Mistral, Qwen2, Qwen3 and Gemma 3: the differences
between them are fields (qkv bias, q/k norm, sliding windows, per-layer RoPE, Gemma's norms,
activation, scales and soft-caps), not separate model classes. Being frozen and hashable, it is
passed to jitted functions as a static argument.
"""

from __future__ import annotations

import dataclasses
from typing import Any

SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "Gemma3ForCausalLM",
)

# model_type -> architecture, for configs built in code (no `architectures` list). "gemma3" is the
# multimodal Gemma3Config: only its text part (`text_config`) is read.
_ARCH_BY_MODEL_TYPE = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
    "gemma3": "Gemma3ForCausalLM",
}
_MULTIMODAL_TEXT_PARTS = {"Gemma3ForConditionalGeneration": "Gemma3ForCausalLM"}
_HIDDEN_ACTS = ("silu", "gelu_pytorch_tanh")
_ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters. `rope_type` is "default", "linear" or "llama3"."""

    theta: float = 10000.0
    rope_type: str = "default"
    # linear and llama3: frequencies are divided by `factor` (linear: all of them).
    factor: float = 1.0
    # llama3 scaling only (see transformers' _compute_llama3_parameters).
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Static description of a decoder-only Llama-family or Gemma 3 model.

    `layer_sliding_windows[i]` is the attention window of layer i in tokens (a query at position p
    sees keys at positions > p - window), or None for full causal attention.

    Gemma 3 fields (defaults give the Llama behaviour):
      rope_local: RoPE of the sliding-window layers (Gemma's `rope_local_base_freq`); None: `rope`.
      attention_scale: softmax scale of the attention scores; None: head_dim ** -0.5. Gemma 3 uses
        query_pre_attn_scalar ** -0.5, which need not equal the head_dim rule.
      gemma_norms: RMSNorm multiplies by (1 + w) in f32 before the cast back (Gemma), instead of
        w times the cast (Llama); and each layer has 4 norms: post-attention and post-MLP norms on
        the sublayer outputs before the residual add, besides the two pre-norms.
      scale_embeddings: embeddings are multiplied by sqrt(hidden_size), rounded to the model dtype.
      attn_logit_softcap / final_logit_softcap: scores (after the scale) / final logits ->
        cap * tanh(x / cap); None: no cap.
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
    qk_norm: bool  # per-head RMSNorm on q and k before RoPE (Qwen3, Gemma 3)
    layer_sliding_windows: tuple[int | None, ...]
    hidden_act: str = "silu"  # "silu" (SwiGLU) or "gelu_pytorch_tanh" (GeGLU, Gemma)
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    rope_local: RopeConfig | None = None
    attention_scale: float | None = None
    gemma_norms: bool = False
    scale_embeddings: bool = False
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    # Not the model's: set by the engine from EngineConfig.batch_invariant (a jit static like the
    # rest of this config). True computes every matmul over fixed row tiles (layers.ROW_TILE).
    batch_invariant: bool = False

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
        if self.hidden_act not in _HIDDEN_ACTS:
            raise ValueError(f"unsupported hidden_act {self.hidden_act!r}; supported: {', '.join(_HIDDEN_ACTS)}")
        for rope in (self.rope, self.rope_local or self.rope):
            if rope.rope_type not in _ROPE_TYPES:
                raise ValueError(f"unsupported rope_type {rope.rope_type!r}; supported: {', '.join(_ROPE_TYPES)}")

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def sm_scale(self) -> float:
        """The attention softmax scale every attention path (dense and paged) must use."""
        return self.head_dim**-0.5 if self.attention_scale is None else self.attention_scale

    @property
    def layer_ropes(self) -> tuple[RopeConfig, ...]:
        """RoPE of each layer: `rope_local` on sliding-window layers when set, else `rope`."""
        local = self.rope_local or self.rope
        return tuple(self.rope if w is None else local for w in self.layer_sliding_windows)

    @classmethod
    def from_hf(cls, hf_config: Any) -> "ModelConfig":
        """Build from a transformers PretrainedConfig (any of SUPPORTED_ARCHITECTURES).

        A multimodal Gemma3Config (Gemma3ForConditionalGeneration) gives its text model's config.
        Raises ValueError naming the value for anything the forward cannot serve.
        """
        archs = list(getattr(hf_config, "architectures", None) or [])
        if not archs:
            # Configs built in code (not loaded) may lack `architectures`; infer from model_type.
            model_type = getattr(hf_config, "model_type", None)
            if model_type not in _ARCH_BY_MODEL_TYPE:
                raise ValueError(
                    f"config has no `architectures` and unsupported model_type {model_type!r}; "
                    f"supported architectures: {', '.join(SUPPORTED_ARCHITECTURES)}"
                )
            archs = [_ARCH_BY_MODEL_TYPE[model_type]]
        arch = _MULTIMODAL_TEXT_PARTS.get(archs[0], archs[0])
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"unsupported architecture {arch!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        if hasattr(hf_config, "text_config") and arch == "Gemma3ForCausalLM":
            hf_config = hf_config.text_config
        num_heads = hf_config.num_attention_heads
        num_kv_heads = getattr(hf_config, "num_key_value_heads", None) or num_heads
        head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // num_heads
        num_layers = hf_config.num_hidden_layers
        if getattr(hf_config, "mlp_bias", False):
            raise ValueError("mlp_bias=True is not supported")
        common = dict(
            architecture=arch,
            vocab_size=hf_config.vocab_size,
            hidden_size=hf_config.hidden_size,
            intermediate_size=hf_config.intermediate_size,
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            rms_norm_eps=float(hf_config.rms_norm_eps),
            max_position_embeddings=int(getattr(hf_config, "max_position_embeddings", 2048)),
            tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
            bos_token_id=getattr(hf_config, "bos_token_id", None),
            eos_token_ids=_as_tuple(getattr(hf_config, "eos_token_id", None)),
        )
        if arch == "Gemma3ForCausalLM":
            return cls(**common, **_gemma3_fields(hf_config, num_layers))
        return cls(
            **common,
            rope=_rope_from_hf(hf_config),
            attention_bias=arch == "Qwen2ForCausalLM" or bool(getattr(hf_config, "attention_bias", False)),
            qk_norm=arch == "Qwen3ForCausalLM",
            layer_sliding_windows=_sliding_windows_from_hf(hf_config, arch, num_layers),
            hidden_act=getattr(hf_config, "hidden_act", "silu"),
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
    return _rope_config(params, theta)


def _rope_config(params: dict, theta: float) -> RopeConfig:
    """RopeConfig from one transformers rope-parameters dict; ValueError for other rope types."""
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
    if rope_type == "linear":
        return RopeConfig(theta=float(theta), rope_type="linear", factor=float(params["factor"]))
    if rope_type != "default":
        raise ValueError(f"unsupported rope_type {rope_type!r}; supported: {', '.join(_ROPE_TYPES)}")
    return RopeConfig(theta=float(theta))


def _gemma3_fields(hf_config, num_layers: int) -> dict:
    """The Gemma 3 specific ModelConfig fields of a Gemma3TextConfig (transformers 4.5x or 5.x).

    transformers 5 keeps per-layer-type RoPE in rope_parameters = {"full_attention": {...},
    "sliding_attention": {...}}; 4.5x had rope_theta + rope_scaling (global layers) and
    rope_local_base_freq (sliding layers).
    """
    if getattr(hf_config, "attention_bias", False):
        raise ValueError("Gemma 3 with attention_bias=True is not supported (it also biases o_proj)")
    if getattr(hf_config, "use_bidirectional_attention", False):
        raise ValueError("use_bidirectional_attention=True (EmbeddingGemma) is not supported: jaxllm is causal")
    act = getattr(hf_config, "hidden_activation", None) or getattr(hf_config, "hidden_act", None)
    params = dict(getattr(hf_config, "rope_parameters", None) or {})
    if "full_attention" in params or "sliding_attention" in params:
        full = dict(params.get("full_attention") or {})
        local = dict(params.get("sliding_attention") or {})
    else:
        full = {**params, **dict(getattr(hf_config, "rope_scaling", None) or {})}
        local = {}
    full_theta = full.get("rope_theta", getattr(hf_config, "rope_theta", None) or 1_000_000.0)
    local_theta = local.get("rope_theta", getattr(hf_config, "rope_local_base_freq", None) or 10_000.0)
    layer_types = list(getattr(hf_config, "layer_types", None) or [])
    if not layer_types:
        pattern = int(getattr(hf_config, "sliding_window_pattern", None) or getattr(hf_config, "_sliding_window_pattern", 6))
        layer_types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(num_layers)]
    unknown = sorted(set(layer_types) - {"sliding_attention", "full_attention"})
    if unknown:
        raise ValueError(f"unsupported Gemma 3 layer_types {unknown}; supported: 'sliding_attention', 'full_attention'")
    window = getattr(hf_config, "sliding_window", None)
    if window is None and "sliding_attention" in layer_types:
        raise ValueError("Gemma 3 config has sliding_attention layers but sliding_window=None")
    scalar = getattr(hf_config, "query_pre_attn_scalar", None)
    return dict(
        rope=_rope_config(full, full_theta),
        rope_local=_rope_config(local, local_theta),
        attention_bias=False,
        qk_norm=True,
        layer_sliding_windows=tuple(window if t == "sliding_attention" else None for t in layer_types),
        hidden_act=act or "gelu_pytorch_tanh",
        attention_scale=None if scalar is None else float(scalar) ** -0.5,
        gemma_norms=True,
        scale_embeddings=True,
        attn_logit_softcap=_optional_float(getattr(hf_config, "attn_logit_softcapping", None)),
        final_logit_softcap=_optional_float(getattr(hf_config, "final_logit_softcapping", None)),
    )


def _optional_float(x) -> float | None:
    return None if x is None else float(x)


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
