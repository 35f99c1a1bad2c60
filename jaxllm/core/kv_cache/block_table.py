"""BlockTable: the device-facing rows of block ids. Host only (numpy, no jax).

    block_table  np.int32 [max_num_seqs, max_blocks_per_seq]: one row per request holding blocks,
                 columns = its block ids in logical order, 0 (the sink) past its last block.

Rows are taken lowest-first and reused after `remove_row`, so batch preparation
(`jaxllm/runner/batch.py`) gathers a step's rows without rebuilding them. Kept apart from the
allocator so swap / pipelining can change one without the other.
"""

from __future__ import annotations

import heapq

import numpy as np


class BlockTable:
    def __init__(self, max_num_seqs: int, max_blocks_per_seq: int):
        if max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
        if max_blocks_per_seq < 1:
            raise ValueError(f"max_blocks_per_seq must be >= 1, got {max_blocks_per_seq}")
        self.max_num_seqs = max_num_seqs
        self.max_blocks_per_seq = max_blocks_per_seq
        self.block_table = np.zeros((max_num_seqs, max_blocks_per_seq), dtype=np.int32)  # [S, B]
        self._rows: dict[str, int] = {}
        self._free_rows: list[int] = list(range(max_num_seqs))  # a heap: lowest row first
        self._lens: dict[str, int] = {}  # blocks written in each row

    def has_row(self, request_id: str) -> bool:
        return request_id in self._rows

    def row_of(self, request_id: str) -> int:
        """Row of `block_table` for a request holding blocks (KeyError otherwise)."""
        return self._rows[request_id]

    def add_row(self, request_id: str) -> int:
        if request_id in self._rows:
            raise ValueError(f"{request_id!r} already has block_table row {self._rows[request_id]}")
        if not self._free_rows:
            # The scheduler never runs more than max_num_seqs requests; this is a wiring bug.
            raise RuntimeError(f"no free block_table row for {request_id!r} (max_num_seqs={self.max_num_seqs})")
        row = self._rows[request_id] = heapq.heappop(self._free_rows)
        self._lens[request_id] = 0
        return row

    def append(self, request_id: str, blocks) -> None:
        """Write `blocks` after the request's last block id."""
        row, n = self._rows[request_id], self._lens[request_id]
        self.block_table[row, n : n + len(blocks)] = blocks
        self._lens[request_id] = n + len(blocks)

    def remove_row(self, request_id: str) -> None:
        row = self._rows.pop(request_id)
        del self._lens[request_id]
        self.block_table[row] = 0
        heapq.heappush(self._free_rows, row)

    def check_invariants(self, blocks: dict[str, list[int]]) -> None:
        """Rows hold exactly `blocks` (request_id -> block ids), free rows are cleared."""
        assert set(self._rows) == set(blocks), "rows assigned to a different set of requests than blocks"
        rows = list(self._rows.values())
        assert len(set(rows)) == len(rows), f"two requests share a block_table row: {self._rows}"
        assert set(rows).isdisjoint(self._free_rows), "a row is both assigned and free"
        assert len(rows) + len(self._free_rows) == self.max_num_seqs, "block_table rows leaked"
        for rid, row in self._rows.items():
            expect = np.zeros(self.max_blocks_per_seq, dtype=np.int32)
            expect[: len(blocks[rid])] = blocks[rid]
            assert np.array_equal(self.block_table[row], expect), (
                f"block_table row {row} of {rid!r} is {self.block_table[row].tolist()}, blocks are {blocks[rid]}"
            )
        for row in self._free_rows:
            assert not self.block_table[row].any(), f"free block_table row {row} is not cleared"
