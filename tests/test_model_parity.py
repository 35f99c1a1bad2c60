"""Parity of jaxllm's dense forward with transformers (PyTorch CPU, fp32, eager attention).

Llama, Mistral, Qwen2, Qwen3 and Gemma 3 cases; Gemma-specific sensitivity and bad-input checks
live in test_gemma3.py.

Tolerance (fp32): max |logits_jax - logits_hf| <= 1e-4 * max|logits_hf| on a 220-token prompt
(observed ~1e-6 at logit scale ~2). Greedy: 32 tokens identical to an HF greedy loop; tie rule: a
divergence is forgiven only at a step where HF's top-2 logits differ by < 1e-4 (then comparison
stops). bf16: stated looser tolerance in test_bf16_smoke.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from jaxllm.model import Model
from jaxllm.models import layers
from jaxllm.models.loader import load_model
from tests.helpers.tiny_models import (
    assert_greedy_match, hf_greedy_with_margins, hf_logits, make_tiny_model, random_prompt,
)

PROMPT_LEN = 220
GREEDY_STEPS = 32
REL_ATOL = 1e-4

LLAMA3_ROPE = dict(
    rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
    # small so that the 16-dim head has frequencies in all three llama3 bands
    original_max_position_embeddings=64,
)

CASES = {
    "llama_gqa2_untied": ("llama", {}),
    "llama_tied_mha": ("llama", dict(tie_word_embeddings=True, num_key_value_heads=4)),
    "llama3_rope_scaling": ("llama", dict(rope_parameters=LLAMA3_ROPE)),
    "mistral_swa64_gqa4": ("mistral", dict(sliding_window=64, num_attention_heads=8, num_key_value_heads=2)),
    "qwen2_bias_mqa": ("qwen2", dict(num_attention_heads=4, num_key_value_heads=1)),
    "qwen3_qknorm_headdim32": ("qwen3", dict(head_dim=32, num_attention_heads=4, num_key_value_heads=2)),
    # per-layer windows: layer 0 full attention, layer 1 sliding (HF layer_types via max_window_layers)
    "qwen2_mixed_swa48": ("qwen2", dict(use_sliding_window=True, sliding_window=48, max_window_layers=1)),
    # Gemma 3 (helper defaults): layers sliding(48) / global alternating, local RoPE base 10k vs
    # global 1M, head_dim 32 != hidden/heads, query_pre_attn_scalar 24 != head_dim, 4 norms a layer.
    "gemma3_swa48_interleaved": ("gemma3", {}),
    "gemma3_mqa_tied_softcaps_linear_rope": ("gemma3", dict(
        num_key_value_heads=1, tie_word_embeddings=True, final_logit_softcapping=3.0, attn_logit_softcapping=2.0,
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1_000_000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}})),
}


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("parity")
    return {name: make_tiny_model(root, arch, name=name, **ov) for name, (arch, ov) in CASES.items()}


def _assert_logits_close(ours, ref, rel_atol=REL_ATOL):
    ours = np.asarray(ours, np.float32)
    scale = float(np.abs(ref).max())
    err = float(np.abs(ours - ref).max())
    assert err <= rel_atol * scale, f"max |diff| {err:.3g} > {rel_atol} * logit scale {scale:.3g}"


def _greedy(model: Model, prompt, n):
    """Greedy by re-running Model.forward each step. The sequence is right-padded to a fixed length
    so it compiles once; causal attention makes the padding invisible to earlier positions."""
    total = len(prompt) + n
    ids = np.zeros(total, np.int32)
    ids[: len(prompt)] = prompt
    out = []
    for step in range(n):
        t = len(prompt) + step
        logits = np.asarray(model.forward(ids))
        tok = int(np.argmax(logits[t - 1]))
        out.append(tok)
        ids[t] = tok
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_logits_and_greedy_match_hf(model_dirs, case):
    path = model_dirs[case]
    model = load_model(path)
    prompt = random_prompt(PROMPT_LEN, model.config.vocab_size, seed=1)
    _assert_logits_close(model.forward(prompt), hf_logits(path, prompt))
    hf_tokens, margins = hf_greedy_with_margins(path, prompt, GREEDY_STEPS)
    assert_greedy_match(_greedy(model, prompt, GREEDY_STEPS), hf_tokens, margins)


@pytest.mark.parametrize("rows", [1, 32, 64, 65])
def test_tied_head_transposed_form_matches_plain_dot(rows):
    # compute_logits' table @ x^T form (up to TIED_HEAD_TRANSPOSED_MAX_ROWS rows) against the
    # [N, V] dot it replaces; the parity cases above run it through whole models.
    import jax

    from jaxllm.models import llama

    rng = np.random.default_rng(rows)
    table = rng.standard_normal((1000, 48), dtype=np.float32)
    x = rng.standard_normal((rows, 48), dtype=np.float32)
    ref = x.astype(np.float64) @ table.T.astype(np.float64)
    for allow in (True, False):
        ours = np.asarray(jax.jit(llama._tied_head, static_argnames="allow_transposed")(table, x, allow_transposed=allow))
        assert ours.shape == (rows, 1000)
        np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-5 * np.abs(ref).max())


def test_config_features_exercised(model_dirs):
    """Guard against a case silently not testing what its name says."""
    cfg = {name: load_model(p).config for name, p in model_dirs.items()}
    assert cfg["llama_gqa2_untied"].num_heads == 2 * cfg["llama_gqa2_untied"].num_kv_heads
    assert cfg["llama_tied_mha"].tie_word_embeddings and cfg["llama_tied_mha"].num_kv_heads == cfg["llama_tied_mha"].num_heads
    assert cfg["llama3_rope_scaling"].rope.rope_type == "llama3"
    assert cfg["mistral_swa64_gqa4"].layer_sliding_windows == (64, 64) and PROMPT_LEN > 64
    assert cfg["mistral_swa64_gqa4"].num_heads == 4 * cfg["mistral_swa64_gqa4"].num_kv_heads
    assert cfg["qwen2_bias_mqa"].attention_bias and cfg["qwen2_bias_mqa"].num_kv_heads == 1
    q3 = cfg["qwen3_qknorm_headdim32"]
    assert q3.qk_norm and q3.head_dim * q3.num_heads != q3.hidden_size
    assert cfg["qwen2_mixed_swa48"].layer_sliding_windows == (None, 48)
    g = cfg["gemma3_swa48_interleaved"]
    assert g.layer_sliding_windows == (48, None, 48, None) and PROMPT_LEN > 48
    assert g.rope_local.theta != g.rope.theta and g.sm_scale != g.head_dim**-0.5
    assert g.gemma_norms and g.scale_embeddings and g.qk_norm and g.hidden_act == "gelu_pytorch_tanh"
    g = cfg["gemma3_mqa_tied_softcaps_linear_rope"]
    assert g.num_kv_heads == 1 and g.tie_word_embeddings and g.rope.rope_type == "linear"
    assert g.attn_logit_softcap == 2.0 and g.final_logit_softcap == 3.0


def test_llama3_inv_freq_matches_transformers(model_dirs):
    import transformers
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    path = model_dirs["llama3_rope_scaling"]
    hf_cfg = transformers.AutoConfig.from_pretrained(path)
    ref, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_cfg, "cpu")
    cfg = load_model(path).config
    ours = layers.rope_inv_freq(cfg.rope, cfg.head_dim)
    np.testing.assert_allclose(ours, ref.numpy(), rtol=1e-6, atol=0)
    plain = layers.rope_inv_freq(dataclasses.replace(cfg.rope, rope_type="default"), cfg.head_dim)
    ratio = ours / plain
    # all three bands present: unscaled (1), divided by factor (1/8), interpolated (in between)
    assert np.isclose(ratio, 1).any() and np.isclose(ratio, 1 / 8).any()
    assert ((ratio > 1 / 8 + 1e-6) & (ratio < 1 - 1e-6)).any()


@pytest.mark.parametrize(
    "case,break_config",
    [
        ("llama_gqa2_untied", lambda c: dataclasses.replace(c, rope=dataclasses.replace(c.rope, theta=c.rope.theta * 1.5))),
        ("mistral_swa64_gqa4", lambda c: dataclasses.replace(c, layer_sliding_windows=(None,) * c.num_layers)),
    ],
    ids=["wrong_rope_theta", "sliding_window_ignored"],
)
def test_deliberately_broken_model_fails_parity(model_dirs, case, break_config):
    """The parity check is sensitive enough to catch a wrong RoPE base or a dropped sliding window."""
    path = model_dirs[case]
    good = load_model(path)
    broken = Model(config=break_config(good.config), params=good.params, dtype=good.dtype)
    prompt = random_prompt(PROMPT_LEN, good.config.vocab_size, seed=1)
    with pytest.raises(AssertionError):
        _assert_logits_close(broken.forward(prompt), hf_logits(path, prompt))


@pytest.mark.parametrize("case", ["llama_gqa2_untied", "qwen3_qknorm_headdim32"])
def test_bf16_smoke(model_dirs, case):
    """bf16 params vs HF fp32: max |diff| <= 5% of logit scale, and >= 90% of argmaxes agree
    (bf16 has ~3 significant digits; near-ties among the tiny model's logits may flip)."""
    path = model_dirs[case]
    model = load_model(path, dtype="bfloat16")
    assert model.params["layers"][0]["q_proj"].dtype.name == "bfloat16"
    prompt = random_prompt(PROMPT_LEN, model.config.vocab_size, seed=2)
    ours = np.asarray(model.forward(prompt))
    assert ours.dtype == np.float32 and np.isfinite(ours).all()
    ref = hf_logits(path, prompt)
    _assert_logits_close(ours, ref, rel_atol=0.05)
    assert (ours.argmax(-1) == ref.argmax(-1)).mean() >= 0.9
