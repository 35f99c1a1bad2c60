"""AttentionMetadata: what the paged attention of one engine step needs, as a jax pytree.

A step runs a ragged batch: T query tokens (padded to a token bucket) that belong to S sequences
(padded to a request bucket). Sequence s owns tokens cu_q_lens[s]:cu_q_lens[s+1]; after this step
its cache holds kv_lens[s] tokens, so its query token i sits at position kv_lens[s] - q_len + i.
Padding sequences have q_len 0 and kv_len 0; padding tokens lie past cu_q_lens[-1] and write their
K/V into block 0, which the block manager never hands out (a sink, so kernels need no masking of
writes).
"""

from __future__ import annotations

import dataclasses

import jax


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AttentionMetadata:
    slot_mapping: jax.Array  # [T] int32: cache slot (block_id * block_size + offset) of each token
    block_tables: jax.Array  # [S, max_blocks_per_seq] int32: physical block ids of each sequence
    kv_lens: jax.Array  # [S] int32: tokens in the cache after this step, new tokens included
    cu_q_lens: jax.Array  # [S + 1] int32: prefix sums of query tokens per sequence
