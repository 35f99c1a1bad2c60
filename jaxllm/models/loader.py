"""Load a local HF checkpoint directory (config.json + safetensors) into a `Model`.

Only safetensors are read: a PyTorch pickle (`*.bin`, `*.pt`) can run arbitrary code on load.
The safetensors reader here is a few lines of numpy (np.memmap + ml_dtypes) so bf16 checkpoints
load without torch, and tensors are read lazily one at a time.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Callable

import ml_dtypes
import jax.numpy as jnp
import numpy as np

from jaxllm.models.model_config import ModelConfig
from jaxllm.models import registry, weights
from jaxllm.models.aliases import known_aliases

GGUF_ALIASES = known_aliases()

_ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


def read_safetensors_index(path: str) -> dict[str, tuple[dict, str]]:
    """name -> (header entry, file path) for one .safetensors file (header only; no data read)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    base = 8 + n
    return {name: (dict(entry, _base=base), path) for name, entry in header.items()}


def _read_tensor(entry: dict, path: str) -> np.ndarray:
    if entry["dtype"] not in _ST_DTYPES:  # not KeyError: that would read as "missing tensor"
        raise ValueError(f"{path}: unsupported safetensors dtype {entry['dtype']!r}")
    dtype = np.dtype(_ST_DTYPES[entry["dtype"]])
    start, end = entry["data_offsets"]
    shape = tuple(entry["shape"])
    if end == start:
        return np.zeros(shape, dtype)
    mm = np.memmap(path, dtype=np.uint8, mode="r", offset=entry["_base"] + start, shape=(end - start,))
    return mm.view(dtype).reshape(shape)


def safetensors_getter(directory: str) -> Callable[[str], np.ndarray]:
    """get_tensor(name) -> np.ndarray over `model.safetensors` or a sharded index in `directory`.

    Raises KeyError for an unknown name (params_from_hf_tensors turns that into a ValueError).
    """
    index_path = os.path.join(directory, "model.safetensors.index.json")
    single = os.path.join(directory, "model.safetensors")
    entries: dict[str, tuple[dict, str]] = {}
    if os.path.exists(index_path):
        with open(index_path) as f:
            weight_map = json.load(f)["weight_map"]
        for shard in sorted(set(weight_map.values())):
            entries.update(read_safetensors_index(os.path.join(directory, shard)))
    elif os.path.exists(single):
        entries = read_safetensors_index(single)
    else:
        others = sorted(
            fn for fn in os.listdir(directory)
            if fn.endswith((".bin", ".pt", ".pth", ".ckpt", ".pkl"))
        )
        if others:
            raise ValueError(
                f"{directory} has only PyTorch pickle weights ({', '.join(others[:3])}); jaxllm refuses to "
                "load pickles because unpickling can run arbitrary code. Convert once with transformers: "
                "AutoModelForCausalLM.from_pretrained(dir).save_pretrained(out_dir, safe_serialization=True)"
            )
        raise ValueError(f"{directory} has no model.safetensors or model.safetensors.index.json")

    def get_tensor(name: str) -> np.ndarray:
        entry, path = entries[name]  # KeyError if missing
        return _read_tensor(entry, path)

    return get_tensor


# A multimodal checkpoint (Gemma3ForConditionalGeneration) keeps its text model under a prefix:
# "model.language_model." (transformers 5) or "language_model.model." (4.5x). ModelConfig.from_hf
# reads its text_config; these let the same HF names find the text weights.
_TEXT_PART_PREFIXES = ("model.language_model.", "language_model.model.")


def _text_part_fallback(get_tensor: Callable[[str], np.ndarray]) -> Callable[[str], np.ndarray]:
    def get(name: str) -> np.ndarray:
        try:
            return get_tensor(name)
        except KeyError:
            if not name.startswith("model."):
                raise
        for prefix in _TEXT_PART_PREFIXES:
            try:
                return get_tensor(prefix + name[len("model."):])
            except KeyError:
                pass
        raise KeyError(name)

    return get


def load_config(path: str) -> ModelConfig:
    """ModelConfig of a local HF directory (transformers AutoConfig; never runs remote code)."""
    import transformers

    hf_config = transformers.AutoConfig.from_pretrained(path, trust_remote_code=False)
    return ModelConfig.from_hf(hf_config)  # ValueError naming an unsupported architecture


def load_model(path: str, dtype: str = "float32", place=None):
    """Load a local HF directory (or, via the GGUF hook, a .gguf file / alias) into a Model.

    dtype: "float32" or "bfloat16" (params are cast on load). place: optional
    weights.params_from_hf_tensors hook to put each tensor straight into its sharding.
    """
    from jaxllm.model import Model

    path = os.fspath(path)
    # --- GGUF hook: jaxllm.models.gguf (another module) reads GGUF and calls params_from_hf_tensors.
    if path.endswith(".gguf") or path.lower() in GGUF_ALIASES:
        from jaxllm.models import gguf  # lazy: gguf is optional for HF checkpoints

        if place is not None:
            return gguf.load_gguf_model(path, dtype, place=place)
        return gguf.load_gguf_model(path, dtype)
    # --- end GGUF hook
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {dtype!r}")
    if not os.path.exists(path):
        raise ValueError(f"model path {path!r} does not exist")
    if not os.path.isdir(path):
        raise ValueError(f"model path {path!r} is not a directory (expected an HF checkpoint dir or a .gguf file)")
    if not os.path.exists(os.path.join(path, "config.json")):
        raise ValueError(f"{path!r} has no config.json; expected a transformers checkpoint directory")
    config = load_config(path)
    registry.get_model_module(config.architecture)  # fail early on a config we cannot run
    get_tensor = _text_part_fallback(safetensors_getter(path))
    params = weights.params_from_hf_tensors(config, get_tensor, jnp.dtype(dtype), place)
    return Model(config=config, params=params, dtype=dtype, path=path)
