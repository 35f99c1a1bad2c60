"""Load a Llama or Gemma 3 GGUF file (llama.cpp's format) into a jaxllm Model, offline.

Path: GGUF tensors --dequantize--> float32 numpy [out, in] --rename + un-permute q/k--> HF tensors
--> `params_from_hf_tensors` (the same entry point safetensors checkpoints use). Going through HF
names means GGUF needs no loader of its own beyond the name map.

Gemma 3: llama.cpp stores every norm weight as (1 + w) (Gemma's norm multiplies by 1 + w); the
reader subtracts 1 again, as transformers' GGUF reader does. Its q/k rows are not permuted.

Why un-permute (Llama): llama.cpp's converter reorders the rows of q_proj/k_proj within each head from
HF's "rotate halves" RoPE layout [x0..x(D/2-1), y0..y(D/2-1)] to interleaved pairs [x0,y0,x1,y1,...]
(GPT-J style). jaxllm (like HF) applies rotate-halves RoPE, so the rows are put back.

Speed: for SmolLM2-135M (Q4_1), `gguf.GGUFReader` spends ~1.5 s parsing the 49k-entry vocab
arrays, transformers ~2 s rebuilding the tokenizer from them, and dequantizing takes ~2 s on a
busy 2-core CPU. All three results are cached under ~/.cache/jaxllm/gguf/<file>-<hash of path,
size, mtime>/: `index.json` (config + tensor offsets), `tokenizer/` (save_pretrained) and
`weights-f32.safetensors` (the dequantized HF-layout tensors, 4 bytes per parameter; a later load
memory-maps it: ~0.5 s instead of ~3 s). The config is built without importing transformers.
Every cache file is written to a temporary name and renamed, so processes may share the directory.
JAXLLM_GGUF_CACHE_DIR moves the cache (empty: off), JAXLLM_GGUF_CACHE_WEIGHTS=0 skips the weights.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import struct
import tempfile
import types
from typing import Callable

import numpy as np

from jaxllm.models.aliases import resolve_model_path
from jaxllm.models.loader import _read_tensor
from jaxllm.models.model_config import ModelConfig

# llama.cpp per-block tensor name -> HF name (within "model.layers.{i}."), per GGUF architecture.
_LLAMA_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# Gemma 3: llama.cpp's ffn_norm is the MLP pre-norm (HF pre_feedforward_layernorm), and
# post_attention_norm is a real post-attention norm (HF post_attention_layernorm).
_GEMMA3_BLOCK_NAMES = {
    **_LLAMA_BLOCK_NAMES,
    "ffn_norm": "pre_feedforward_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
}
_BLOCK_NAMES = {"llama": _LLAMA_BLOCK_NAMES, "gemma3": _GEMMA3_BLOCK_NAMES}
_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")
_GLOBAL_RE = re.compile(r"^(\w+)\.(weight|bias)$")


def gguf_to_hf_name(name: str, arch: str = "llama") -> str | None:
    """'blk.3.attn_q.weight' -> 'model.layers.3.self_attn.q_proj.weight'; None if unknown.

    arch: the GGUF `general.architecture` ("llama" or "gemma3"; their ffn_norm differ).
    """
    m = _BLOCK_RE.match(name)
    if m:
        layer, part, kind = m.groups()
        hf = _BLOCK_NAMES[arch].get(part)
        return None if hf is None else f"model.layers.{layer}.{hf}.{kind}"
    m = _GLOBAL_RE.match(name)
    if m:
        hf = _GLOBAL_NAMES.get(m.group(1))
        return None if hf is None else f"{hf}.{m.group(2)}"
    return None


def unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation. w: [n_heads*D, ...] -> same shape, HF row order.

    llama.cpp built row (h, 2i+j) from HF row (h, j*D/2+i); this is the inverse.
    """
    d = w.shape[0] // n_heads
    return w.reshape(n_heads, d // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


DEFAULT_CACHE_DIR = "~/.cache/jaxllm/gguf"  # expanded at call time, not import time
# Environment overrides of the default cache: JAXLLM_GGUF_CACHE_DIR=<dir> moves it, an empty value
# turns all GGUF caching off; JAXLLM_GGUF_CACHE_WEIGHTS=0 keeps the small index and tokenizer
# but not the dequantized weights (4 bytes per parameter: ~540 MB for SmolLM2-135M).
CACHE_DIR_ENV, CACHE_WEIGHTS_ENV = "JAXLLM_GGUF_CACHE_DIR", "JAXLLM_GGUF_CACHE_WEIGHTS"
_WEIGHTS_FILE = "weights-f32.safetensors"
# Process-wide counters (tests count them): GGUF loads whose weights came from / went to the cache.
NUM_WEIGHT_CACHE_HITS = [0]
NUM_WEIGHT_CACHE_WRITES = [0]


def _cache_entry(path: str, cache_dir: str | None) -> str | None:
    """Per-file cache directory, keyed by absolute path, size and mtime (so a replaced file misses)."""
    if cache_dir == DEFAULT_CACHE_DIR:
        cache_dir = os.environ.get(CACHE_DIR_ENV, DEFAULT_CACHE_DIR) or None
    if cache_dir is None:
        return None
    st = os.stat(path)
    key = f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}"
    name = f"{os.path.basename(path)}-{hashlib.sha1(key.encode()).hexdigest()[:16]}"
    return os.path.join(os.path.expanduser(cache_dir), name)


class GGUFCheckpoint:
    """An open GGUF file: its ModelConfig (`model_config`, built without importing transformers;
    `hf_config` is the transformers config, on demand) and a lazy HF-named tensor getter.

    `get_tensor(hf_name)` returns float32 numpy in HF layout (Linear weights [out, in]).
    cache_dir: where a small JSON index (config + each tensor's type/shape/file offset, ~50 KB) is
    kept, so later opens skip `gguf.GGUFReader`, whose parsing of the vocab arrays is slow. None
    disables every cache. cache_weights (None: on unless JAXLLM_GGUF_CACHE_WEIGHTS=0): tensors
    dequantized within `caching_weights()` are also written to the entry's weights file, and a
    checkpoint opened while a valid one exists (`weights_cached`) reads them from it (memmap) instead
    of dequantizing. Without a valid file, tensors are np.memmap'ed and dequantized one at a time.
    """

    def __init__(self, path_or_alias: str, cache_dir: str | None = DEFAULT_CACHE_DIR,
                 cache_weights: bool | None = None):
        import gguf  # imported here: only GGUF users pay for it

        self.path = resolve_model_path(path_or_alias)
        self._dequantize = gguf.quants.dequantize
        self._qtype = gguf.GGMLQuantizationType
        entry = _cache_entry(self.path, cache_dir)
        index_file = None if entry is None else os.path.join(entry, "index.json")
        index = None
        if index_file is not None and os.path.exists(index_file):
            with open(index_file) as f:
                index = json.load(f)
        if index is None or index.get("version") != _INDEX_VERSION:
            index = self._build_index(gguf.GGUFReader(self.path))
            if index_file is not None:
                _try_write_json(index_file, index)
        self._tensors = index["tensors"]  # HF name -> {type, data_shape, dtype, offset}
        self._config = index["config"]
        # The fields `ModelConfig.from_hf` reads, without transformers: importing it (it pulls in
        # torch) took ~4 s of a ~10 s second start on SmolLM2. Every field it reads is in the dict
        # or defaults there as in LlamaConfig / Gemma3TextConfig (test_gguf checks equality).
        self.model_config = ModelConfig.from_hf(types.SimpleNamespace(**self._config))
        self._model_type = self._config["model_type"]
        if cache_weights is None:
            cache_weights = os.environ.get(CACHE_WEIGHTS_ENV, "1") != "0"
        self._weights_file = None if entry is None or not cache_weights else os.path.join(entry, _WEIGHTS_FILE)
        # What a cached weights file must record to be used: this exact file, and this reader's
        # tensor layout (index version). The entry name already hashes path, size and mtime.
        st = os.stat(self.path)
        self._identity = {"source": os.path.abspath(self.path), "size": str(st.st_size),
                          "mtime_ns": str(st.st_mtime_ns), "index_version": str(_INDEX_VERSION)}
        self._cached = None if self._weights_file is None else self._open_weight_cache()
        self._writer = None

    @property
    def weights_cached(self) -> bool:
        """True when get_tensor reads dequantized weights from the cache (no dequantization)."""
        return self._cached is not None

    def _open_weight_cache(self) -> dict | None:
        """{HF name: safetensors entry} of a valid cached weights file, else None (missing,
        another source file's, another layout, or truncated)."""
        try:
            with open(self._weights_file, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(n))
            size = os.path.getsize(self._weights_file)
        except (OSError, ValueError, struct.error):
            return None
        if header.pop("__metadata__", None) != self._identity or set(header) != set(self._tensors):
            return None
        for name, e in header.items():
            if e["dtype"] != "F32" or e["shape"] != self._tensors[name]["shape"] or 8 + n + e["data_offsets"][1] > size:
                return None
        return {name: dict(e, _base=8 + n) for name, e in header.items()}

    @contextlib.contextmanager
    def caching_weights(self):
        """Within it, the tensors get_tensor dequantizes are also written to the weights cache,
        which is published (atomically, complete) on a normal exit; on an exception, or when
        the cache is off or already valid, nothing is written."""
        if self._cached is not None or self._weights_file is None:
            yield
            return
        try:
            self._writer = _WeightCacheWriter(self._weights_file, self._identity, self._tensors)
        except OSError:  # e.g. a read-only cache directory: only costs speed
            yield
            return
        writer = self._writer
        try:
            yield  # an exception of the caller's propagates (and the temporary is discarded)
            for name in self._tensors:  # any tensor the caller did not ask for
                if writer.ok and name not in writer.written:
                    self.get_tensor(name)
            if writer.ok:
                writer.commit()
                NUM_WEIGHT_CACHE_WRITES[0] += 1
                _remove_stale_weights(self._weights_file, self._identity["source"])
        finally:
            writer.discard()
            self._writer = None

    @property
    def hf_config(self):
        """The transformers config (LlamaConfig / Gemma3TextConfig); imports transformers."""
        return _hf_config(self._config)

    def _build_index(self, reader) -> dict:
        def field(key, default=None):
            f = reader.fields.get(key)
            return default if f is None else f.contents()

        arch = field("general.architecture")
        if arch not in _BLOCK_NAMES:
            raise NotImplementedError(
                f"GGUF architecture {arch!r} is not supported (only {', '.join(map(repr, _BLOCK_NAMES))}): {self.path}"
            )
        tensors = {}
        for t in reader.tensors:
            hf = gguf_to_hf_name(t.name, arch)
            if hf is None:
                # e.g. rope_freqs (llama3 RoPE scaling baked into a tensor): refuse, don't ignore.
                raise NotImplementedError(f"unsupported GGUF tensor {t.name!r} in {self.path}")
            # data_shape/dtype: what GGUFReader exposes (quantized: uint8 [rows, bytes per row]),
            # i.e. what gguf.quants.dequantize expects; shape: the logical HF [out, in].
            tensors[hf] = {
                "type": int(t.tensor_type), "data_shape": [int(s) for s in t.data.shape],
                "dtype": t.data.dtype.str, "offset": int(t.data_offset),
                "shape": [int(s) for s in reversed(t.shape)],
            }
        hidden = int(field(f"{arch}.embedding_length"))
        n_heads = int(field(f"{arch}.attention.head_count"))
        head_dim = int(field(f"{arch}.attention.key_length", hidden // n_heads))
        scaling = field(f"{arch}.rope.scaling.type", "none")
        eos = field("tokenizer.ggml.eos_token_id")
        config = dict(
            vocab_size=tensors["model.embed_tokens.weight"]["shape"][0],
            hidden_size=hidden,
            intermediate_size=int(field(f"{arch}.feed_forward_length")),
            num_hidden_layers=int(field(f"{arch}.block_count")),
            num_attention_heads=n_heads,
            num_key_value_heads=int(field(f"{arch}.attention.head_count_kv", n_heads)),
            head_dim=head_dim,
            rms_norm_eps=float(field(f"{arch}.attention.layer_norm_rms_epsilon")),
            max_position_embeddings=int(field(f"{arch}.context_length", 2048)),
            # llama.cpp drops output.weight when the head is tied to the embedding.
            tie_word_embeddings="lm_head.weight" not in tensors,
            bos_token_id=field("tokenizer.ggml.bos_token_id"),
            eos_token_id=None if eos is None else int(eos),
        )
        theta = float(field(f"{arch}.rope.freq_base", 10000.0))
        if arch == "llama":
            if scaling not in ("none", None):
                raise NotImplementedError(f"GGUF RoPE scaling {scaling!r} is not supported: {self.path}")
            config.update(model_type="llama", architectures=["LlamaForCausalLM"], rope_theta=theta)
        else:
            config.update(model_type="gemma3_text", architectures=["Gemma3ForCausalLM"],
                          **_gemma3_gguf_fields(field, theta, scaling, head_dim, self.path))
        return {"version": _INDEX_VERSION, "config": config, "tensors": tensors}

    def tensor_names(self) -> list[str]:
        return list(self._tensors)

    def get_tensor(self, hf_name: str) -> np.ndarray:
        """Dequantized float32 tensor in HF layout, e.g. q_proj [nH*D, H]."""
        t = self._tensors.get(hf_name)
        if t is None:
            raise KeyError(f"tensor {hf_name!r} not in GGUF file {self.path}")
        if self._cached is not None:
            return _read_tensor(self._cached[hf_name], self._weights_file)
        w = self._dequantized(hf_name, t)
        if self._writer is not None:
            self._writer.put(hf_name, w)
        return w

    def _dequantized(self, hf_name: str, t: dict) -> np.ndarray:
        raw = np.memmap(self.path, dtype=np.dtype(t["dtype"]), mode="r", offset=t["offset"],
                        shape=tuple(t["data_shape"]))
        w = np.asarray(self._dequantize(raw, self._qtype(t["type"])), dtype=np.float32).reshape(t["shape"])
        if self._model_type == "gemma3_text":
            # llama.cpp stores Gemma's norm weights as the (1 + w) they multiply by; HF (and
            # jaxllm) keep w. Gemma's q/k rows are not permuted (llama.cpp permutes only Llama's).
            return w - np.float32(1.0) if hf_name.endswith("norm.weight") else w
        if ".self_attn.q_proj." in hf_name:
            w = unpermute_rope_rows(w, self.model_config.num_heads)
        elif ".self_attn.k_proj." in hf_name:
            w = unpermute_rope_rows(w, self.model_config.num_kv_heads)
        return w


_INDEX_VERSION = 2  # 2: config carries model_type (llama or gemma3_text)


class _WeightCacheWriter:
    """Streams float32 tensors into a temporary safetensors file next to `path`, in any order;
    `commit` renames it onto `path` (a concurrent reader sees the old file, none, or the whole
    new one: never half of one), `discard` removes an uncommitted temporary."""

    def __init__(self, path: str, metadata: dict, tensors: dict):
        layout, offset = {}, 0
        for name in sorted(tensors):
            nbytes = 4 * math.prod(tensors[name]["shape"])
            layout[name] = {"dtype": "F32", "shape": tensors[name]["shape"], "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        header = json.dumps({"__metadata__": metadata, **layout}).encode()
        header += b" " * (-len(header) % 8)  # the data starts 8-byte aligned (memmap-friendly)
        self.path, self.layout, self.written, self._base = path, layout, set(), 8 + len(header)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, self._tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
        self._file = os.fdopen(fd, "wb")
        self._file.write(struct.pack("<Q", len(header)) + header)
        self._file.truncate(self._base + offset)

    @property
    def ok(self) -> bool:
        """False once a write failed (the temporary is gone; nothing will be committed)."""
        return self._file is not None

    def put(self, name: str, w: np.ndarray) -> None:
        if self._file is None:
            return
        try:
            self._file.seek(self._base + self.layout[name]["data_offsets"][0])
            self._file.write(np.ascontiguousarray(w, dtype=np.float32).data)
            self.written.add(name)
        except OSError:  # e.g. disk full: give up on the cache, not on the load
            self.discard()

    def commit(self) -> None:
        """Publish the file; best effort (an OSError, e.g. disk full on close, leaves no cache)."""
        assert self.written == set(self.layout), sorted(set(self.layout) - self.written)
        try:
            self._file.close()
            self._file = None
            os.chmod(self._tmp, 0o644)
            os.replace(self._tmp, self.path)
            self._tmp = None
        except OSError:
            self.discard()

    def discard(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tmp is not None:
            try:
                os.remove(self._tmp)
            except OSError:
                pass
            self._tmp = None


def _remove_stale_weights(current: str, source: str) -> None:
    """Delete cached weights of earlier versions of `source` (other size / mtime entries), so a
    re-downloaded model does not leave its old ~4 bytes per parameter behind."""
    root, entry = os.path.split(os.path.dirname(current))
    prefix = os.path.basename(source) + "-"
    for other in os.listdir(root):
        old = os.path.join(root, other, _WEIGHTS_FILE)
        if other == entry or not other.startswith(prefix) or not os.path.exists(old):
            continue
        try:
            with open(old, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                if json.loads(f.read(n)).get("__metadata__", {}).get("source") == source:
                    os.remove(old)  # safe under a reader: its memmap keeps the data
        except (OSError, ValueError, struct.error):
            pass


def _gemma3_gguf_fields(field, theta: float, scaling, head_dim: int, path: str) -> dict:
    """Gemma3TextConfig fields the GGUF header lacks, filled in as llama.cpp does (llama-model.cpp,
    LLM_ARCH_GEMMA3): every 6th layer global, local RoPE base 10000, attention scale
    head_dim ** -0.5 (query_pre_attn_scalar = head_dim; only the 27B differs, hidden / heads).
    transformers' GGUF reader leaves the same fields at Gemma3TextConfig's defaults, which agree
    for every size but the 27B."""
    n_layers = int(field("gemma3.block_count"))
    if n_layers == 62:  # the 27B: llama.cpp's LLM_TYPE_27B scale rule
        head_dim = int(field("gemma3.embedding_length")) // int(field("gemma3.attention.head_count"))
    full = {"rope_type": "default", "rope_theta": theta}
    if scaling == "linear":  # Gemma 3 4B+ (factor 8 on the global layers)
        full = {"rope_type": "linear", "rope_theta": theta, "factor": float(field("gemma3.rope.scaling.factor"))}
    elif scaling not in ("none", None):
        raise NotImplementedError(f"GGUF RoPE scaling {scaling!r} is not supported: {path}")
    return dict(
        sliding_window=int(field("gemma3.attention.sliding_window")),
        layer_types=["sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(n_layers)],
        rope_parameters={"full_attention": full, "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}},
        query_pre_attn_scalar=head_dim,
    )


def _hf_config(kwargs: dict):
    from transformers import CONFIG_MAPPING

    kwargs = dict(kwargs)
    return CONFIG_MAPPING[kwargs.pop("model_type")](**kwargs)


def _try_write_json(path: str, obj) -> None:
    """Best effort (a read-only cache dir only costs speed). Write-then-rename: a concurrent
    reader sees no file or the whole file, never half of one."""
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError:
        pass


def load_gguf_model(
    path_or_alias: str, dtype="float32", place: Callable | None = None, cache_dir: str | None = DEFAULT_CACHE_DIR,
    cache_weights: bool | None = None,
):
    """Build a jaxllm Model from a GGUF file or alias (e.g. "smollm2-135m-instruct").

    dtype: parameter dtype, "float32" (default: the weights were 4-bit anyway, and on CPU f32
    matmuls are no slower than bf16) or "bfloat16" (a jnp dtype works too). place: optional
    per-tensor device placement hook, as in `params_from_hf_tensors`. cache_dir, cache_weights:
    see GGUFCheckpoint (the first load of a file writes its dequantized weights, later ones read them).
    Returns `jaxllm.model.Model`, whose `.forward(token_ids [T]) -> logits [T, V]`.
    """
    import jax.numpy as jnp

    from jaxllm.model import Model
    from jaxllm.models.weights import params_from_hf_tensors

    dtype_name = jnp.dtype(dtype).name  # Model (like loader.load_model) takes the name
    if dtype_name not in ("float32", "bfloat16"):
        raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {dtype!r}")
    ckpt = GGUFCheckpoint(path_or_alias, cache_dir, cache_weights)
    config = ckpt.model_config
    if ckpt.weights_cached:
        NUM_WEIGHT_CACHE_HITS[0] += 1
    with ckpt.caching_weights():
        params = params_from_hf_tensors(config, ckpt.get_tensor, jnp.dtype(dtype_name), place=place)
    return Model(config=config, params=params, dtype=dtype_name, path=ckpt.path)


# tokenizer_config.json classes that are transformers' PreTrainedTokenizerFast itself (transformers
# 5 names it TokenizersBackend): what AutoTokenizer would build, without its import of the config
# machinery, which imports torch (~2 s of a SmolLM2 start).
_FAST_TOKENIZER_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")


def _load_saved_tokenizer(directory: str):
    """AutoTokenizer.from_pretrained(directory), the same class, cheaper when it is the plain fast one."""
    try:
        with open(os.path.join(directory, "tokenizer_config.json")) as f:
            cls = json.load(f).get("tokenizer_class")
    except (OSError, ValueError):
        cls = None
    import transformers

    if cls in _FAST_TOKENIZER_CLASSES and transformers.PreTrainedTokenizerFast.__name__ == cls:
        return transformers.PreTrainedTokenizerFast.from_pretrained(directory)
    return transformers.AutoTokenizer.from_pretrained(directory)


def load_gguf_tokenizer(path_or_alias: str, cache_dir: str | None = DEFAULT_CACHE_DIR):
    """The transformers tokenizer stored in the GGUF file, chat template included.

    transformers rebuilds it from the GGUF vocab and merges (seconds); the result is saved with
    `save_pretrained` under cache_dir (~3 MB) and later calls load that instead. None: no cache.
    """
    path = resolve_model_path(path_or_alias)
    entry = _cache_entry(path, cache_dir)
    cached = None if entry is None else os.path.join(entry, "tokenizer")
    if cached is not None and os.path.isdir(cached):
        return _load_saved_tokenizer(cached)
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    except ModuleNotFoundError as e:
        # transformers' GGUF reader imports torch at module level, even to read a tokenizer.
        raise ImportError(
            f"building the tokenizer of {path} needs transformers' GGUF reader, which imports torch "
            f"({e}); install it with `pip install -e '.[gguf]'` (torch==2.13.0, the CPU build here). "
            f"Later loads use the cached tokenizer and no longer need torch."
        ) from e
    if cached is not None:
        tmp = None
        try:  # best effort, as for index.json
            os.makedirs(entry, exist_ok=True)
            tmp = tempfile.mkdtemp(dir=entry)
            tok.save_pretrained(tmp)
            os.chmod(tmp, 0o755)
            os.rename(tmp, cached)  # atomic; loses harmlessly to a concurrent writer
        except OSError:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
    return tok
