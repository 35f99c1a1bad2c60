"""Scheduler output -> padded numpy arrays for one engine step. Host only: never imports jax.

Shapes are bucketed so the jitted step compiles once per bucket: the token count T is padded to
the smallest token bucket that holds the scheduled tokens, and the request count to
S = min(T, max_num_seqs) (every scheduled request has at least one token, so S >= requests).
Tying S to T keeps the number of compiled variants equal to the number of token buckets.
"""

from __future__ import annotations

import bisect
import dataclasses

import numpy as np


@dataclasses.dataclass
class BatchInputs:
    token_ids: np.ndarray  # [T] int32
    positions: np.ndarray  # [T] int32
    slot_mapping: np.ndarray  # [T] int32; padding tokens write into sink block 0
    block_tables: np.ndarray  # [S, max_blocks_per_seq] int32
    kv_lens: np.ndarray  # [S] int32; cache length after this step, 0 for padding rows
    cu_q_lens: np.ndarray  # [S + 1] int32
    logits_indices: np.ndarray  # [S] int32: the last token of each row (0 for padding rows)
    num_tokens: int  # real tokens (<= T)
    num_seqs: int  # real rows (<= S)
    # Async scheduling only (else None): per token, the row of the step still on the device
    # whose sampled token feeds it (the host does not know that id yet; token_ids holds 0
    # there), -1 where token_ids holds the token. The runner resolves it on the device.
    take_index: np.ndarray | None = None  # [T] int32

    @property
    def padded_num_tokens(self) -> int:
        return int(self.token_ids.shape[0])

    @property
    def padded_num_seqs(self) -> int:
        return int(self.kv_lens.shape[0])


def pick_bucket(n: int, buckets: tuple[int, ...]) -> int:
    """The smallest bucket >= n. `buckets` is sorted ascending."""
    i = bisect.bisect_left(buckets, n)
    if i == len(buckets):
        raise ValueError(f"{n} tokens exceed the largest bucket {buckets[-1]}")
    return buckets[i]


def padded_shape(num_tokens: int, token_buckets: tuple[int, ...], max_num_seqs: int) -> tuple[int, int]:
    """(T, S) for a step with `num_tokens` real tokens."""
    t = pick_bucket(num_tokens, token_buckets)
    return t, min(t, max_num_seqs)


def prepare_batch(
    scheduled: list,
    block_table: np.ndarray,
    row_of,
    block_size: int,
    token_buckets: tuple[int, ...],
    max_num_seqs: int,
    in_flight_rows: dict[str, int] | None = None,
) -> BatchInputs:
    """Lay out the scheduled requests as one ragged, padded batch.

    Args:
      scheduled: ScheduledRequest items (request, num_new_tokens) in batch order.
      block_table: [max_num_seqs, max_blocks_per_seq] int32, the block manager's table.
      row_of: request_id -> row of `block_table`.
      in_flight_rows: async scheduling: request_id -> its row in the step on the device, for
        the requests that step samples a token for; a row whose last token is that one (a
        placeholder, request.num_output_placeholders) takes it from there (take_index).
        None: a synchronous engine (no take_index; every token must be on the host).
    """
    q_lens = np.array([s.num_new_tokens for s in scheduled], dtype=np.int32)
    num_tokens = int(q_lens.sum())
    t_pad, s_pad = padded_shape(num_tokens, token_buckets, max_num_seqs)
    if len(scheduled) > s_pad:
        raise ValueError(f"{len(scheduled)} requests exceed the {s_pad} rows of bucket T={t_pad}")

    token_ids = np.zeros(t_pad, np.int32)
    positions = np.zeros(t_pad, np.int32)
    slot_mapping = np.zeros(t_pad, np.int32)  # block 0 is the sink for padding tokens
    block_tables = np.zeros((s_pad, block_table.shape[1]), np.int32)
    kv_lens = np.zeros(s_pad, np.int32)
    cu_q_lens = np.zeros(s_pad + 1, np.int32)
    cu_q_lens[1 : len(scheduled) + 1] = np.cumsum(q_lens)
    cu_q_lens[len(scheduled) + 1 :] = num_tokens
    logits_indices = np.zeros(s_pad, np.int32)
    take_index = None if in_flight_rows is None else np.full(t_pad, -1, np.int32)

    for i, item in enumerate(scheduled):
        # The schedule-time snapshot: async scheduling advances the request's count at dispatch.
        req, start, n = item.request, item.num_computed_tokens, item.num_new_tokens
        lo = cu_q_lens[i]
        known = len(req.prompt_token_ids) + len(req.output_token_ids)
        if start + n > known:  # its last token is in flight: a one-token decode row
            take_index[lo + n - 1] = in_flight_rows[req.request_id]
            token_ids[lo : lo + n - 1] = req.token_slice(start, known)
        else:
            token_ids[lo : lo + n] = req.token_slice(start, start + n)
        pos = np.arange(start, start + n, dtype=np.int32)
        positions[lo : lo + n] = pos
        row = block_table[row_of(req.request_id)]
        slot_mapping[lo : lo + n] = row[pos // block_size] * block_size + pos % block_size
        block_tables[i] = row
        kv_lens[i] = start + n
        logits_indices[i] = lo + n - 1

    return BatchInputs(
        token_ids=token_ids,
        positions=positions,
        slot_mapping=slot_mapping,
        block_tables=block_tables,
        kv_lens=kv_lens,
        cu_q_lens=cu_q_lens,
        logits_indices=logits_indices,
        num_tokens=num_tokens,
        num_seqs=len(scheduled),
        take_index=take_index,
    )
