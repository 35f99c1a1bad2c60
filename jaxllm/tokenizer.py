"""Tokenizer loading for a model path (HF directory, .gguf file or alias)."""

from __future__ import annotations

import os

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")


def load_tokenizer(model: str):
    """A transformers tokenizer for `model`, or None when the directory ships none.

    Without a tokenizer the engine still serves token-id prompts (text fields are empty), like
    vLLM's skip_tokenizer_init.
    """
    from jaxllm.models.aliases import resolve_model_path

    path = resolve_model_path(model)
    if str(path).endswith(".gguf"):
        from jaxllm.models.gguf import load_gguf_tokenizer

        return load_gguf_tokenizer(path)
    if os.path.isdir(path) and any(os.path.exists(os.path.join(path, f)) for f in _TOKENIZER_FILES):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    return None
