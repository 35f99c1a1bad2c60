"""Tiny random transformers models for parity tests (fp32, PyTorch CPU).

    path = make_tiny_model(tmp_path, arch="llama", num_key_value_heads=1)   # HF dir (safetensors)
    hf_greedy(path, prompt_ids, n) -> list[int]                           # HF greedy continuation
    hf_logits(path, token_ids) -> np.ndarray [T, V] float32
    tokens, margins = hf_greedy_with_margins(path, prompt_ids, n)
    assert_greedy_match(ours, tokens, margins)                            # with the tie rule below
    random_prompt(n, vocab_size, seed) -> list[int]

Archs: "llama", "mistral", "qwen2", "qwen3", "gemma3" (kwargs override the transformers config
fields). The gemma3 default: 4 layers alternating sliding (window 48) and global attention,
head_dim 32 != hidden/heads, query_pre_attn_scalar 24 != head_dim, local RoPE base 10k vs global 1M.
Norm weights and q/k/v biases are randomised too (HF initialises them to 1 / 0, which would hide
a dropped norm or bias; Gemma's (1 + w) norms to 0). Tie rule: a greedy divergence is forgiven only at a step where HF's top-2
logits differ by less than TIE_TOL; comparison stops there.
"""

from __future__ import annotations

import functools
import os
import tempfile

import numpy as np

TIE_TOL = 1e-4

_BASE = dict(
    vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
    rms_norm_eps=1e-6, initializer_range=0.05, tie_word_embeddings=False,
    bos_token_id=1, eos_token_id=2, pad_token_id=0,
)

_ARCHS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(num_attention_heads=8, num_key_value_heads=2, sliding_window=64)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(num_key_value_heads=1)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=32)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        num_hidden_layers=4, head_dim=32, query_pre_attn_scalar=24, sliding_window=48,
        layer_types=["sliding_attention", "full_attention"] * 2,
        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}})),
}


def make_tiny_model(tmp_path, arch: str = "llama", seed: int = 0, name: str | None = None, **overrides) -> str:
    """Build, randomise and save_pretrained(safe_serialization=True) a tiny HF model; return its dir."""
    import torch
    import transformers

    cfg_name, model_name, arch_defaults = _ARCHS[arch]
    kwargs = {**_BASE, **arch_defaults, **overrides}
    config = getattr(transformers, cfg_name)(**kwargs)
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config).to(torch.float32).eval()
    gemma_offset = 0.0 if arch.startswith("gemma") else 1.0
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname:
                # Effective scale 1 + 0.2 N(0,1) in both conventions: Gemma's norms multiply by
                # (1 + w), so their w is centred on 0 (centred on 1 it would double every norm).
                p.copy_(gemma_offset + 0.2 * torch.randn_like(p))
            elif pname.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
    if name is not None:
        out = os.path.join(str(tmp_path), name)
    else:
        os.makedirs(str(tmp_path), exist_ok=True)
        out = tempfile.mkdtemp(prefix=f"{arch}-", dir=str(tmp_path))  # unique: several models per test
    model.save_pretrained(out, safe_serialization=True)
    return out


@functools.lru_cache(maxsize=8)
def hf_model(path: str):
    """The saved model loaded back with transformers (fp32, eager attention, eval mode)."""
    import torch
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager"
    ).eval()


def hf_logits(path: str, token_ids) -> np.ndarray:
    """Logits [T, V] float32 of one sequence at positions 0..T-1."""
    import torch

    model = hf_model(path)
    kwargs = {}
    cap = getattr(model.config, "attn_logit_softcapping", None)
    if cap is not None and model.config.model_type == "gemma3_text":
        # transformers' Gemma3Attention reads attn_logit_softcapping but never hands it to the
        # attention function (Gemma2's does); its eager attention applies `softcap` when given.
        kwargs["softcap"] = cap
    with torch.no_grad():
        ids = torch.tensor([list(token_ids)], dtype=torch.long)
        return model(input_ids=ids, **kwargs).logits[0].float().numpy()


def hf_greedy_with_margins(path: str, prompt_ids, n: int) -> tuple[list[int], list[float]]:
    """n greedy tokens (full forward each step, no cache) and HF's top1-top2 logit gap at each step."""
    ids = list(prompt_ids)
    tokens, margins = [], []
    for _ in range(n):
        last = hf_logits(path, ids)[-1]
        top2 = np.sort(last)[-2:]
        tok = int(np.argmax(last))
        tokens.append(tok)
        margins.append(float(top2[1] - top2[0]))
        ids.append(tok)
    return tokens, margins


def hf_greedy(path: str, prompt_ids, n: int) -> list[int]:
    """n greedy tokens from transformers for prompt_ids."""
    return hf_greedy_with_margins(path, prompt_ids, n)[0]


def assert_greedy_match(ours, hf_tokens, margins, tie_tol: float = TIE_TOL) -> None:
    """Tokens must be equal; a divergence is forgiven only where HF's top-2 gap < tie_tol (then stop)."""
    ours = [int(t) for t in ours]
    assert len(ours) >= len(hf_tokens), (ours, hf_tokens)
    for step, (a, b) in enumerate(zip(ours, hf_tokens)):
        if a != b:
            assert margins[step] < tie_tol, (
                f"greedy diverged at step {step}: ours {a}, HF {b} (HF top-2 gap {margins[step]:.3g} >= {tie_tol}); "
                f"ours={ours} hf={list(hf_tokens)}"
            )
            return


def random_prompt(n: int, vocab_size: int, seed: int = 0) -> list[int]:
    """n token ids in [3, vocab_size) (skips pad/bos/eos)."""
    return np.random.default_rng(seed).integers(3, vocab_size, size=n).tolist()
