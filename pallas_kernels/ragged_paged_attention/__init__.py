"""Ragged paged attention (mixed prefill + decode over a paged KV cache): TPU and GPU kernels.

    ragged_paged_attention_tpu(q, k_cache, v_cache, kv_lens, block_tables, cu_q_lens, *,
                               sm_scale, sliding_window=None, soft_cap=None, interpret=False)
    ragged_paged_attention_gpu(...same...)
    write_kv(k_cache, v_cache, k, v, slot_mapping)

See README.md for the designs.
"""

from .common import validate_inputs, write_kv
from .gpu import ragged_paged_attention as ragged_paged_attention_gpu
from .tpu import ragged_paged_attention as ragged_paged_attention_tpu

__all__ = ["ragged_paged_attention_gpu", "ragged_paged_attention_tpu", "validate_inputs",
           "write_kv"]
