"""BlockPool: the physical KV-cache blocks, their ref counts, free queue and hash map. Host only.

The KV cache is `num_blocks` blocks of `block_size` token slots. Block 0 is a reserved sink: it is
never handed out, padding tokens write their K/V there, and unused block-table entries point at
it, so the device never needs to mask writes.

State:
  ref_counts     np.int32 [num_blocks]: how many requests hold each block. Prefix-cache hits
                 make blocks shared, so a block may have several owners.
  free queue     every block with ref count 0, in eviction order (an LRU): blocks are taken from
                 the head and freed blocks join the tail. A free block may still hold cached K/V
                 and keep its hash until it is taken for new content (evicted) or hit again
                 (taken out of the queue, wherever it is). Callers free a request's blocks
                 tail-first, so within a chain the tail is evicted before the head, which is the
                 part other requests are most likely to share.
  hash map       block hash -> block id, for blocks whose K/V is (or, within the step that
                 computes it, is about to be) the content that hash names. At most one block
                 per hash: a second block computing the same content stays uncached.
  block_hashes   [num_blocks] the hash each block is cached under, or None.

Policy (which blocks to cache, when they count as computed) is the manager's; this is mechanism.
"""

from __future__ import annotations

import collections

import numpy as np

from jaxllm.core.kv_cache.hashing import BlockHash


class BlockPool:
    def __init__(self, num_blocks: int, enable_caching: bool = True):
        if num_blocks < 2:
            raise ValueError(f"num_blocks must be >= 2 (block 0 is a reserved sink), got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.ref_counts = np.zeros(num_blocks, dtype=np.int32)  # [num_blocks]
        # An OrderedDict is a doubly linked list with O(1) removal from the middle (hits).
        self._free: collections.OrderedDict[int, None] = collections.OrderedDict.fromkeys(range(1, num_blocks))
        self.block_hashes: list[BlockHash | None] = [None] * num_blocks
        self.cached_block_hash_to_block: dict[BlockHash, int] = {}

    # -- queries --
    @property
    def num_usable_blocks(self) -> int:
        return self.num_blocks - 1

    @property
    def num_free_blocks(self) -> int:
        """Blocks with ref count 0, cached or not (a cached free block is evictable)."""
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_usable_blocks - len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        return len(self.cached_block_hash_to_block)

    def free_block_ids(self) -> list[int]:
        """The free queue, head (evicted first) to tail."""
        return list(self._free)

    def get_cached_block(self, block_hash: BlockHash) -> int | None:
        return self.cached_block_hash_to_block.get(block_hash)

    # -- mutation --
    def get_new_blocks(self, num_blocks: int) -> list[int]:
        """Take `num_blocks` blocks from the head of the free queue (ref count 1 each).

        A taken block that still holds cached content is evicted: its hash leaves the map.
        """
        if num_blocks > len(self._free):
            raise ValueError(f"cannot take {num_blocks} blocks, {len(self._free)} free")
        out = []
        for _ in range(num_blocks):
            block, _ = self._free.popitem(last=False)
            self._uncache(block)
            self.ref_counts[block] = 1
            out.append(block)
        return out

    def touch(self, blocks) -> None:
        """One more owner for each block (prefix-cache hits); free ones leave the free queue."""
        for block in blocks:
            if self.ref_counts[block] == 0:
                del self._free[block]
            self.ref_counts[block] += 1

    def free_blocks(self, ordered_blocks) -> None:
        """One owner fewer for each block; those reaching 0 join the free queue's tail in the
        given order (so pass a request's blocks tail-first: its tail is then evicted first)."""
        for block in ordered_blocks:
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self._free[block] = None

    def cache_block(self, block: int, block_hash: BlockHash) -> bool:
        """Make `block` findable under `block_hash`. False (nothing changes) when caching is off
        or another block already holds that content: the first one stays the one found."""
        if not self.enable_caching or block_hash in self.cached_block_hash_to_block:
            return False
        if self.block_hashes[block] is not None:
            raise ValueError(f"block {block} is already cached under another hash")
        self.cached_block_hash_to_block[block_hash] = block
        self.block_hashes[block] = block_hash
        return True

    def uncache_block(self, block: int) -> None:
        """Forget the block's content (no-op if it is not cached)."""
        self._uncache(block)

    def _uncache(self, block: int) -> None:
        h = self.block_hashes[block]
        if h is not None:
            del self.cached_block_hash_to_block[h]
            self.block_hashes[block] = None

    def reset_prefix_cache(self) -> bool:
        """Forget every cached block, as vLLM: only when no block is in use (returns False, and
        changes nothing, otherwise), since a running request's blocks may be shared."""
        if self.num_used_blocks:
            return False
        self.cached_block_hash_to_block.clear()
        self.block_hashes = [None] * self.num_blocks
        return True

    # -- checking --
    def check_invariants(self, owners: np.ndarray) -> None:
        """Raise AssertionError on the first inconsistency. owners: [num_blocks] owner counts."""
        free = list(self._free)
        free_set = set(free)
        assert 0 not in free_set, "sink block 0 is in the free queue"
        assert self.ref_counts[0] == 0 and owners[0] == 0, "sink block 0 is owned"
        assert self.block_hashes[0] is None, "sink block 0 is cached"
        for b in free:
            assert owners[b] == 0, f"block {b} is both free and owned"
        mismatch = np.nonzero(owners != self.ref_counts)[0]
        assert mismatch.size == 0, (
            f"ref counts != owners at blocks {mismatch.tolist()}: "
            f"refs={self.ref_counts[mismatch].tolist()} owners={owners[mismatch].tolist()}"
        )
        owned = set(np.nonzero(owners)[0].tolist())
        leaked = set(range(1, self.num_blocks)) - owned - free_set
        assert not leaked, f"leaked blocks (neither free nor owned): {sorted(leaked)}"
        for h, b in self.cached_block_hash_to_block.items():
            assert 0 < b < self.num_blocks, f"hash map points at invalid block {b}"
            assert self.block_hashes[b] == h, f"hash map entry for block {b} disagrees with the block's hash"
        num_hashed = sum(h is not None for h in self.block_hashes)
        assert num_hashed == len(self.cached_block_hash_to_block), (
            f"{num_hashed} blocks carry a hash but the map has {len(self.cached_block_hash_to_block)}"
        )
        assert self.enable_caching or num_hashed == 0, "caching is off but blocks are cached"
