"""Checkpoint loading: safetensors (single and sharded), refusals with clear errors, orbax round trip."""

from __future__ import annotations

import json
import os
import shutil

import jax
import numpy as np
import pytest

from jaxllm.model import Model
from jaxllm.models import weights
from jaxllm.models.loader import load_model
from tests.helpers.tiny_models import make_tiny_model, random_prompt


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("load"), "llama", name="llama")


def _copy(src, tmp_path, name="copy"):
    dst = os.path.join(str(tmp_path), name)
    shutil.copytree(src, dst)
    return dst


def _rewrite_safetensors(directory, edit):
    from safetensors.numpy import load_file, save_file

    f = os.path.join(directory, "model.safetensors")
    tensors = dict(load_file(f))
    edit(tensors)
    save_file(tensors, f, metadata={"format": "pt"})


def test_params_structure_matches_specs(llama_dir):
    model = load_model(llama_dir)
    specs = weights.param_specs(model.config, np.float32)
    is_spec = lambda x: isinstance(x, weights.ParamSpec)  # noqa: E731
    assert jax.tree.structure(specs, is_leaf=is_spec) == jax.tree.structure(model.params)
    for sp, arr in zip(jax.tree.leaves(specs, is_leaf=is_spec), jax.tree.leaves(model.params)):
        assert sp.shape == arr.shape and sp.dtype == arr.dtype and len(sp.logical_axes) == arr.ndim
    rand = weights.init_params(model.config, jax.random.key(0))
    assert jax.tree.structure(rand) == jax.tree.structure(model.params)


def test_unsupported_architecture(llama_dir, tmp_path):
    d = _copy(llama_dir, tmp_path)
    cfg_path = os.path.join(d, "config.json")
    cfg = json.load(open(cfg_path))
    cfg["architectures"] = ["FalconForCausalLM"]
    json.dump(cfg, open(cfg_path, "w"))
    with pytest.raises(ValueError, match="unsupported architecture 'FalconForCausalLM'.*LlamaForCausalLM"):
        load_model(d)


def test_missing_tensor(llama_dir, tmp_path):
    d = _copy(llama_dir, tmp_path)
    _rewrite_safetensors(d, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"missing tensor 'model\.layers\.1\.mlp\.up_proj\.weight'"):
        load_model(d)


def test_wrong_shape_names_tensor_and_both_shapes(llama_dir, tmp_path):
    d = _copy(llama_dir, tmp_path)
    name = "model.layers.0.self_attn.k_proj.weight"
    _rewrite_safetensors(d, lambda t: t.__setitem__(name, np.zeros((16, 64), np.float32)))
    with pytest.raises(ValueError) as exc:
        load_model(d)
    msg = str(exc.value)
    assert name in msg and "(16, 64)" in msg and "(32, 64)" in msg, msg


def test_pickle_only_dir_is_refused(llama_dir, tmp_path):
    import torch
    from safetensors.torch import load_file

    d = os.path.join(str(tmp_path), "bin_only")
    os.makedirs(d)
    shutil.copy(os.path.join(llama_dir, "config.json"), d)
    torch.save(load_file(os.path.join(llama_dir, "model.safetensors")), os.path.join(d, "pytorch_model.bin"))
    with pytest.raises(ValueError, match="(?s)pickle.*arbitrary code.*safe_serialization=True"):
        load_model(d)


def test_missing_path_and_bad_dtype(llama_dir, tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_model(os.path.join(str(tmp_path), "nope"))
    with pytest.raises(ValueError, match="dtype"):
        load_model(llama_dir, dtype="float16")


def test_sharded_safetensors_with_index(tmp_path):
    import transformers

    single = make_tiny_model(tmp_path, "qwen2", name="single")
    hf = transformers.AutoModelForCausalLM.from_pretrained(single)
    sharded = os.path.join(str(tmp_path), "sharded")
    hf.save_pretrained(sharded, safe_serialization=True, max_shard_size="100KB")
    assert os.path.exists(os.path.join(sharded, "model.safetensors.index.json"))
    assert len([f for f in os.listdir(sharded) if f.endswith(".safetensors")]) > 1
    prompt = random_prompt(40, 512)
    a = np.asarray(load_model(single).forward(prompt))
    b = np.asarray(load_model(sharded).forward(prompt))
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_orbax_round_trip(llama_dir, tmp_path, dtype):
    model = load_model(llama_dir, dtype=dtype)
    ckpt = os.path.join(str(tmp_path), "ckpt")
    model.save(ckpt)
    restored = Model.restore(ckpt)
    assert restored.config == model.config and restored.dtype == dtype
    prompt = random_prompt(50, 512)
    np.testing.assert_array_equal(np.asarray(model.forward(prompt)), np.asarray(restored.forward(prompt)))


def test_orbax_restore_into_shardings(llama_dir, tmp_path):
    model = load_model(llama_dir)
    ckpt = os.path.join(str(tmp_path), "ckpt")
    model.save(ckpt)
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = jax.tree.map(lambda _: sharding, model.params)
    restored = Model.restore(ckpt, shardings=shardings)
    assert all(x.sharding == sharding for x in jax.tree.leaves(restored.params))


def test_gguf_paths_dispatch_to_gguf_loader(monkeypatch):
    import jaxllm.models.gguf as gguf

    calls = []
    monkeypatch.setattr(gguf, "load_gguf_model", lambda path, dtype: calls.append((path, dtype)) or "sentinel")
    assert load_model("/somewhere/model.gguf", dtype="bfloat16") == "sentinel"
    assert load_model("smollm2-135m-instruct") == "sentinel"
    assert calls == [("/somewhere/model.gguf", "bfloat16"), ("smollm2-135m-instruct", "float32")]


def test_place_hook_is_used(llama_dir):
    seen = []

    def place(spec, arr):
        seen.append(spec.logical_axes)
        return jax.numpy.asarray(arr, spec.dtype)

    load_model(llama_dir, place=place)
    assert ("embed", "q_heads") in seen and ("vocab", "embed") in seen


def test_bf16_safetensors_checkpoint(llama_dir, tmp_path):
    """A bf16 checkpoint is read without torch (ml_dtypes) and values survive exactly."""
    import torch
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(llama_dir).to(torch.bfloat16)
    d = os.path.join(str(tmp_path), "bf16")
    hf.save_pretrained(d, safe_serialization=True)
    model = load_model(d, dtype="float32")
    want = hf.model.layers[0].self_attn.q_proj.weight.detach().float().numpy().T
    np.testing.assert_array_equal(np.asarray(model.params["layers"][0]["q_proj"]), want)
