"""BlockManager: which physical KV-cache blocks each request owns. Host only (numpy, no jax).

The KV cache is `num_blocks` blocks of `block_size` token slots; slot = block_id * block_size + offset.
Block 0 is a reserved sink: it is never handed out, padding tokens write their K/V there, and unused
entries of `block_table` point at it, so the device never needs to mask writes.

State:
  free queue      FIFO of free block ids. Freed blocks go to the back, so a block just released is
                  the last to be reused (when prefix caching arrives, recently freed blocks stay
                  findable the longest, as in vLLM's block pool).
  ref_counts      np.int32 [num_blocks]: number of requests owning each block. Today every block has
                  one owner; `fork` lets two requests share blocks (prefix sharing / n > 1 later).
  blocks          request_id -> list of block ids, in logical order.
  block_table     np.int32 [max_num_seqs, max_blocks_per_seq]: one row per request holding blocks,
                  columns = its block ids, 0 (the sink) past its last block. Rows are taken
                  lowest-first and reused after `free`, so the batch preparation can gather rows.
"""

from __future__ import annotations

import collections
import heapq

import numpy as np


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, max_num_seqs: int, max_blocks_per_seq: int):
        if num_blocks < 2:
            raise ValueError(f"num_blocks must be >= 2 (block 0 is a reserved sink), got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        if max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
        if max_blocks_per_seq < 1:
            raise ValueError(f"max_blocks_per_seq must be >= 1, got {max_blocks_per_seq}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.max_blocks_per_seq = max_blocks_per_seq

        self._free: collections.deque[int] = collections.deque(range(1, num_blocks))
        self.ref_counts = np.zeros(num_blocks, dtype=np.int32)  # [num_blocks]
        self._blocks: dict[str, list[int]] = {}
        self._rows: dict[str, int] = {}
        self._free_rows: list[int] = list(range(max_num_seqs))  # a heap: lowest row first
        self.block_table = np.zeros((max_num_seqs, max_blocks_per_seq), dtype=np.int32)  # [S, B]

    # -- queries --
    @property
    def num_usable_blocks(self) -> int:
        return self.num_blocks - 1

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_usable_blocks - len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of usable blocks (block 0 excluded) in use, in [0, 1]."""
        return self.num_used_blocks / self.num_usable_blocks

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= len(self._free)

    def blocks_of(self, request_id: str) -> list[int]:
        """The request's block ids in logical order (a copy; [] if it holds none)."""
        return list(self._blocks.get(request_id, ()))

    def has_blocks(self, request_id: str) -> bool:
        return request_id in self._blocks

    def row_of(self, request_id: str) -> int:
        """Row of `block_table` for a request holding blocks (KeyError otherwise)."""
        return self._rows[request_id]

    def num_blocks_needed(self, request_id: str, num_tokens_total: int) -> int:
        """Extra blocks the request needs so its blocks cover `num_tokens_total` token slots."""
        have = len(self._blocks.get(request_id, ()))
        return max(0, cdiv(num_tokens_total, self.block_size) - have)

    def max_tokens_per_seq(self) -> int:
        return self.max_blocks_per_seq * self.block_size

    # -- mutation --
    def allocate_for(self, request_id: str, num_tokens_total: int) -> bool:
        """Grow the request's blocks to cover `num_tokens_total` slots (positions 0..total-1).

        Returns False, changing nothing, if there are not enough free blocks or the request would
        exceed max_blocks_per_seq. Never shrinks: a smaller total is a no-op returning True.
        """
        need = self.num_blocks_needed(request_id, num_tokens_total)
        if need == 0:
            return True
        have = self._blocks.get(request_id)
        if (len(have) if have else 0) + need > self.max_blocks_per_seq or need > len(self._free):
            return False
        if have is None:
            if not self._free_rows:
                # The scheduler never runs more than max_num_seqs requests; this is a wiring bug.
                raise RuntimeError(f"no free block_table row for {request_id!r} (max_num_seqs={self.max_num_seqs})")
            row = heapq.heappop(self._free_rows)
            self._rows[request_id] = row
            have = self._blocks[request_id] = []
        row = self._rows[request_id]
        for _ in range(need):
            block = self._free.popleft()
            self.ref_counts[block] += 1
            self.block_table[row, len(have)] = block
            have.append(block)
        return True

    def fork(self, parent_id: str, child_id: str) -> None:
        """Make `child_id` share all of `parent_id`'s blocks (ref counts +1; no copy-on-write yet)."""
        if child_id in self._blocks:
            raise ValueError(f"{child_id!r} already holds blocks")
        blocks = self._blocks.get(parent_id)
        if not blocks:
            raise KeyError(f"{parent_id!r} holds no blocks")
        if not self._free_rows:
            raise RuntimeError(f"no free block_table row for {child_id!r}")
        row = heapq.heappop(self._free_rows)
        self._rows[child_id] = row
        self._blocks[child_id] = list(blocks)
        self.ref_counts[blocks] += 1
        self.block_table[row, : len(blocks)] = blocks

    def free(self, request_id: str) -> None:
        """Release the request's blocks and row. Unknown / blockless requests are a no-op.

        Blocks whose ref count drops to 0 join the back of the free queue in reverse logical order
        (tail first), as vLLM does, so a future prefix cache evicts a sequence's tail before its head.
        """
        blocks = self._blocks.pop(request_id, None)
        if blocks is None:
            return
        for block in reversed(blocks):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self._free.append(block)
        row = self._rows.pop(request_id)
        self.block_table[row] = 0
        heapq.heappush(self._free_rows, row)

    # -- checking --
    def check_invariants(self) -> None:
        """Raise AssertionError describing the first inconsistency found."""
        free = list(self._free)
        free_set = set(free)
        assert len(free_set) == len(free), f"duplicate block in free queue: {sorted(free)}"
        assert 0 not in free_set, "sink block 0 is in the free queue"
        owners = np.zeros(self.num_blocks, dtype=np.int64)
        for rid, blocks in self._blocks.items():
            assert blocks, f"{rid!r} has an empty block list (should have been dropped)"
            assert len(set(blocks)) == len(blocks), f"{rid!r} owns a block twice: {blocks}"
            assert len(blocks) <= self.max_blocks_per_seq, f"{rid!r} owns {len(blocks)} > max_blocks_per_seq"
            for b in blocks:
                assert 0 < b < self.num_blocks, f"{rid!r} owns invalid block {b}"
                assert b not in free_set, f"block {b} is both free and owned by {rid!r}"
                owners[b] += 1
        mismatch = np.nonzero(owners != self.ref_counts)[0]
        assert mismatch.size == 0, (
            f"ref counts != owners at blocks {mismatch.tolist()}: "
            f"refs={self.ref_counts[mismatch].tolist()} owners={owners[mismatch].tolist()}"
        )
        owned = set(np.nonzero(owners)[0].tolist())
        leaked = set(range(1, self.num_blocks)) - owned - free_set
        assert not leaked, f"leaked blocks (neither free nor owned): {sorted(leaked)}"
        assert len(owned) + len(free_set) == self.num_usable_blocks, "free + owned != usable blocks"
        # block table rows
        assert set(self._rows) == set(self._blocks), "rows assigned to a different set of requests than blocks"
        rows = list(self._rows.values())
        assert len(set(rows)) == len(rows), f"two requests share a block_table row: {self._rows}"
        assert set(rows).isdisjoint(self._free_rows), "a row is both assigned and free"
        assert len(rows) + len(self._free_rows) == self.max_num_seqs, "block_table rows leaked"
        for rid, row in self._rows.items():
            blocks = self._blocks[rid]
            expect = np.zeros(self.max_blocks_per_seq, dtype=np.int32)
            expect[: len(blocks)] = blocks
            assert np.array_equal(self.block_table[row], expect), (
                f"block_table row {row} of {rid!r} is {self.block_table[row].tolist()}, blocks are {blocks}"
            )
        for row in self._free_rows:
            assert not self.block_table[row].any(), f"free block_table row {row} is not cleared"

    def __repr__(self) -> str:
        return (
            f"BlockManager(num_blocks={self.num_blocks}, block_size={self.block_size}, "
            f"free={self.num_free_blocks}, requests={len(self._blocks)})"
        )
