"""Load a Llama-architecture GGUF file (llama.cpp's format) into a jaxllm Model, offline.

Path: GGUF tensors --dequantize--> float32 numpy [out, in] --rename + un-permute q/k--> HF tensors
--> `params_from_hf_tensors` (the same entry point safetensors checkpoints use). Going through HF
names means GGUF needs no loader of its own beyond the name map.

Why un-permute: llama.cpp's converter reorders the rows of q_proj/k_proj within each head from
HF's "rotate halves" RoPE layout [x0..x(D/2-1), y0..y(D/2-1)] to interleaved pairs [x0,y0,x1,y1,...]
(GPT-J style). jaxllm (like HF) applies rotate-halves RoPE, so the rows are put back.

Speed: for SmolLM2-135M (Q4_1), parsing the file takes ~1.5 s (mostly the 49k-entry vocab
arrays) and dequantizing all tensors with gguf's numpy kernels ~1 s, so no on-disk cache of the
dequantized weights is kept: it would save ~1 s at the cost of ~540 MB of float32 on disk.
Tensors are dequantized lazily, one at a time, as `params_from_hf_tensors` asks for them.
"""

from __future__ import annotations

import os
import re
from typing import Callable

import numpy as np

from jaxllm.models.aliases import resolve_model_path

# llama.cpp per-block tensor name -> HF name (within "model.layers.{i}.").
_BLOCK_NAMES = {
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
_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")
_GLOBAL_RE = re.compile(r"^(\w+)\.(weight|bias)$")


def gguf_to_hf_name(name: str) -> str | None:
    """'blk.3.attn_q.weight' -> 'model.layers.3.self_attn.q_proj.weight'; None if unknown."""
    m = _BLOCK_RE.match(name)
    if m:
        layer, part, kind = m.groups()
        hf = _BLOCK_NAMES.get(part)
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


class GGUFCheckpoint:
    """An open GGUF file: its HF config and a lazy HF-named tensor getter.

    `get_tensor(hf_name)` returns float32 numpy in HF layout (Linear weights [out, in]).
    """

    def __init__(self, path_or_alias: str):
        import gguf  # imported here: only GGUF users pay for it

        self.path = resolve_model_path(path_or_alias)
        self.reader = gguf.GGUFReader(self.path)
        self._dequantize = gguf.quants.dequantize
        self.arch = self._field("general.architecture")
        if self.arch != "llama":
            raise NotImplementedError(
                f"GGUF architecture {self.arch!r} is not supported (only 'llama'): {self.path}"
            )
        self._tensors = {}  # HF name -> gguf ReaderTensor
        for t in self.reader.tensors:
            hf = gguf_to_hf_name(t.name)
            if hf is None:
                # e.g. rope_freqs (llama3 RoPE scaling baked into a tensor): refuse, don't ignore.
                raise NotImplementedError(f"unsupported GGUF tensor {t.name!r} in {self.path}")
            self._tensors[hf] = t
        self.hf_config = self._build_hf_config()

    def _field(self, key: str, default=None):
        f = self.reader.fields.get(key)
        return default if f is None else f.contents()

    def _build_hf_config(self):
        from transformers import LlamaConfig

        a = self.arch
        hidden = int(self._field(f"{a}.embedding_length"))
        n_heads = int(self._field(f"{a}.attention.head_count"))
        scaling = self._field(f"{a}.rope.scaling.type", "none")
        if scaling not in ("none", None):
            raise NotImplementedError(f"GGUF RoPE scaling {scaling!r} is not supported: {self.path}")
        embd = self._tensors["model.embed_tokens.weight"]
        eos = self._field("tokenizer.ggml.eos_token_id")
        return LlamaConfig(
            architectures=["LlamaForCausalLM"],
            vocab_size=int(embd.shape[-1]),  # gguf shapes are [in, out]: last dim is the vocab
            hidden_size=hidden,
            intermediate_size=int(self._field(f"{a}.feed_forward_length")),
            num_hidden_layers=int(self._field(f"{a}.block_count")),
            num_attention_heads=n_heads,
            num_key_value_heads=int(self._field(f"{a}.attention.head_count_kv", n_heads)),
            head_dim=int(self._field(f"{a}.attention.key_length", hidden // n_heads)),
            rms_norm_eps=float(self._field(f"{a}.attention.layer_norm_rms_epsilon")),
            rope_theta=float(self._field(f"{a}.rope.freq_base", 10000.0)),
            max_position_embeddings=int(self._field(f"{a}.context_length", 2048)),
            # llama.cpp drops output.weight when the head is tied to the embedding.
            tie_word_embeddings="lm_head.weight" not in self._tensors,
            bos_token_id=self._field("tokenizer.ggml.bos_token_id"),
            eos_token_id=None if eos is None else int(eos),
        )

    def tensor_names(self) -> list[str]:
        return list(self._tensors)

    def get_tensor(self, hf_name: str) -> np.ndarray:
        """Dequantized float32 tensor in HF layout, e.g. q_proj [nH*D, H]."""
        t = self._tensors.get(hf_name)
        if t is None:
            raise KeyError(f"tensor {hf_name!r} not in GGUF file {self.path}")
        # dequantize returns numpy shape = reversed gguf shape, i.e. HF's [out, in].
        w = np.asarray(self._dequantize(t.data, t.tensor_type), dtype=np.float32)
        w = w.reshape([int(s) for s in reversed(t.shape)])
        if ".self_attn.q_proj." in hf_name:
            w = unpermute_rope_rows(w, self.hf_config.num_attention_heads)
        elif ".self_attn.k_proj." in hf_name:
            w = unpermute_rope_rows(w, self.hf_config.num_key_value_heads)
        return w


def load_gguf_model(path_or_alias: str, dtype="float32", place: Callable | None = None):
    """Build a jaxllm Model from a GGUF file or alias (e.g. "smollm2-135m-instruct").

    dtype: parameter dtype, "float32" (default: the weights were 4-bit anyway, and on CPU f32
    matmuls are no slower than bf16) or "bfloat16" (a jnp dtype works too). place: optional
    per-tensor device placement hook, as in `params_from_hf_tensors`.
    Returns `jaxllm.model.Model`, whose `.forward(token_ids [T]) -> logits [T, V]`.
    """
    import jax.numpy as jnp

    from jaxllm.model import Model
    from jaxllm.models.model_config import ModelConfig
    from jaxllm.models.weights import params_from_hf_tensors

    dtype_name = jnp.dtype(dtype).name  # Model (like loader.load_model) takes the name
    if dtype_name not in ("float32", "bfloat16"):
        raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {dtype!r}")
    ckpt = GGUFCheckpoint(path_or_alias)
    config = ModelConfig.from_hf(ckpt.hf_config)
    params = params_from_hf_tensors(config, ckpt.get_tensor, jnp.dtype(dtype_name), place=place)
    return Model(config=config, params=params, dtype=dtype_name, path=ckpt.path)


def load_gguf_tokenizer(path_or_alias: str):
    """The transformers tokenizer stored in the GGUF file, chat template included."""
    from transformers import AutoTokenizer

    path = resolve_model_path(path_or_alias)
    return AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
