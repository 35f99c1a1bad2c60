"""HF architecture name -> module implementing `forward` and `compute_logits`.

All supported architectures share jaxllm.models.llama (Gemma 3 too: its differences are
ModelConfig fields); a family that needs another forward adds one entry here.
"""

from __future__ import annotations

import importlib
from types import ModuleType

_MODULES = {
    "LlamaForCausalLM": "jaxllm.models.llama",
    "MistralForCausalLM": "jaxllm.models.llama",
    "Qwen2ForCausalLM": "jaxllm.models.llama",
    "Qwen3ForCausalLM": "jaxllm.models.llama",
    "Gemma3ForCausalLM": "jaxllm.models.llama",
}

SUPPORTED_ARCHITECTURES = tuple(_MODULES)


def get_model_module(architecture: str) -> ModuleType:
    """The module with forward(...) / compute_logits(...) for `architecture`; ValueError if unknown."""
    try:
        return importlib.import_module(_MODULES[architecture])
    except KeyError:
        raise ValueError(
            f"unsupported architecture {architecture!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        ) from None
