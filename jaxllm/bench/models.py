"""Models for benchmarks: a name or path as LLM takes it, or a random-init Llama built once.

    path = resolve_model("random:tiny", cache_dir)    # built with transformers, cached by shape

Random weights are fine for throughput: every benchmark request ignores EOS, so lengths are
exact. Shapes: tiny (2 layers, hidden 64: smoke runs and tests), small (4 layers, hidden 256:
the sharing / preemption experiments), 138m (12 layers, hidden 768, tied: GPT-2-small-like).
Host only (torch and transformers are imported when a model is built).
"""

from __future__ import annotations

import hashlib
import json
import os

SHAPES = {
    "tiny": dict(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, intermediate_size=128, tie_word_embeddings=False),
    "small": dict(vocab_size=8000, hidden_size=256, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=8, intermediate_size=1024, tie_word_embeddings=True),
    "138m": dict(vocab_size=32000, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 num_key_value_heads=12, intermediate_size=3072, tie_word_embeddings=True),
}


def build_model(model_kwargs: dict, cache_dir: str, max_position_embeddings: int = 2048, seed: int = 0) -> str:
    """Random-init LlamaForCausalLM saved as safetensors under cache_dir (built once per shape)."""
    kwargs = dict(model_kwargs, max_position_embeddings=max_position_embeddings, rms_norm_eps=1e-5,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
    tag = hashlib.sha1(json.dumps(kwargs, sort_keys=True).encode()).hexdigest()[:10]
    cache_dir = os.path.expanduser(cache_dir)
    path = os.path.join(cache_dir, f"llama-h{kwargs['hidden_size']}-l{kwargs['num_hidden_layers']}-{tag}")
    if os.path.exists(os.path.join(path, "model.safetensors")):
        return path
    import torch
    import transformers

    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kwargs)).to(torch.float32)
    tmp = path + f".tmp{os.getpid()}"
    model.save_pretrained(tmp, safe_serialization=True)
    os.replace(tmp, path)  # atomic: concurrent runs never see a half-written dir
    return path


def resolve_model(model: str, cache_dir: str, max_model_len: int = 2048) -> str:
    """A path (or alias) LLM accepts. "random:SHAPE" builds (once) a random Llama of that shape
    whose max_position_embeddings covers max_model_len."""
    if not model.startswith("random:"):
        return model
    shape = model.split(":", 1)[1]
    if shape not in SHAPES:
        raise ValueError(f"unknown random model {model!r}; choose from {['random:' + s for s in SHAPES]}")
    return build_model(SHAPES[shape], cache_dir, max_position_embeddings=max(2048, max_model_len))


def hf_config(model_dir: str):
    """The transformers config of a model directory (None for aliases / GGUF files we can't read)."""
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        return None  # never ask the Hub: an alias or a GGUF file has no local HF config
    try:
        import transformers

        return transformers.AutoConfig.from_pretrained(model_dir)
    except Exception:  # noqa: BLE001 - an alias or a .gguf file: no roofline arithmetic then
        return None
