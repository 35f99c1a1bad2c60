"""Run a ragged paged attention kernel per device over its own heads (shard_map).

GSPMD can partition the jnp reference attention along heads on its own, but a Pallas kernel is
opaque to it (it would be run on gathered, unsharded inputs or refuse to partition). Attention
is independent per head, and the KV-head layout of rules.py gives every device exactly the KV
heads its query heads read, with the same group size num_heads / num_kv_heads locally; so the
kernel can run unchanged on each device's slice, with no communication.
"""

from __future__ import annotations

import functools

from jax.sharding import Mesh, PartitionSpec as P

from jaxllm.parallel.mesh import TP_AXIS

_HEADS = P(None, TP_AXIS, None)  # q / out [T, nH, D]
_CACHE = P(None, None, TP_AXIS, None)  # [num_blocks, block_size, nKV, D]


def shard_map_attention(attention_fn, mesh: Mesh, axis_names=None):
    """Wrap `ragged_paged_attention(q, k_cache, v_cache, kv_lens, block_tables, cu_q_lens, *,
    sm_scale, sliding_window=None, soft_cap=None) -> [T, nH, D]` to run per device on
    q [T, nH/tp, D] and caches [num_blocks, block_size, nKV/tp, D]; metadata is replicated.
    The wrapper has the same signature as the wrapped function, on global shapes.
    axis_names={"tp"}: inside the pipeline tick, already manual over "pp" (nested shard_map)."""
    import jax

    def wrapped(q, k_cache, v_cache, kv_lens, block_tables, cu_q_lens, *, sm_scale,
                sliding_window=None, soft_cap=None):
        kwargs = dict(sm_scale=sm_scale, sliding_window=sliding_window)
        if soft_cap is not None:
            kwargs["soft_cap"] = soft_cap
        local = functools.partial(attention_fn, **kwargs)
        return jax.shard_map(
            local,
            # Nested: the context's mesh (its "pp" already manual) must be the one named.
            mesh=mesh if axis_names is None else jax.sharding.get_abstract_mesh(),
            in_specs=(_HEADS, _CACHE, _CACHE, P(), P(), P()),
            out_specs=_HEADS,
            **({} if axis_names is None else {"axis_names": set(axis_names)}),
            check_vma=False,  # kernels (pallas_call) carry no varying-axis annotations
        )(q, k_cache, v_cache, kv_lens, block_tables, cu_q_lens)

    return wrapped
