"""KVCacheManager: which blocks each request holds, prefix-cache lookups, slot allocation.
Host only (numpy, no jax).

The scheduler asks three things and never touches the pool:
  get_computed_blocks(request)   at admission: the longest run of cached full blocks of the
                                 request's tokens (a lookup; nothing changes)
  allocate_slots(request, n, computed)
                                 own the computed blocks and enough new ones for n more tokens
                                 past them, or change nothing and return False
  cache_blocks(request, num_tokens)
                                 after scheduling: make the request's blocks that are full of
                                 its first num_tokens tokens findable by other requests
and `free(request)` when it finishes or is preempted; with a host pool (swap preemption) also
  swap_out(request)              copy plan of its computed blocks to host blocks; drops its
                                 device blocks as free() does, or None (nothing changes) if full
  swap_in(request, n)            device blocks for all its swapped blocks plus n more tokens,
                                 and the copy plan back; or None (nothing changes)

Swap and the prefix cache: a swapped-out request copies every computed block it holds, shared or
cached ones included (its own copy), then drops its references exactly as a recompute preemption
does: a shared block stays with its other owners, a cached one stays findable in the free queue
until evicted. Swap-in takes fresh device blocks for all of them (never a hit: the request brings
its content with it); its full blocks are then offered to the cache like any computed block, and
where another block already holds that hash the first stays the one found.

When may a block be found? Once its K/V is written, or within the step that writes it if every
write happens before any read. The jaxllm step writes all of a step's K/V into the cache in each
layer before that layer's attention reads (runner.make_paged_attention), so the scheduler caches
a request's blocks as soon as their computation is scheduled for good, and a request admitted
later in the same step may hit them. A block scheduled but never computed (its request left
between schedule and update) is uncached again when the request frees it.

Block ids: see block_pool.py (block 0 is the sink; free queue is an LRU of possibly cached blocks).
The device-facing rows live in block_table.py (`block_table`, `row_of` are exposed here).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxllm.core.kv_cache.block_pool import BlockPool
from jaxllm.core.kv_cache.block_table import BlockTable
from jaxllm.core.kv_cache.hashing import DEFAULT_HASH_SEED, root_hash, update_block_hashes


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclasses.dataclass(frozen=True)
class ComputedBlocks:
    """A prefix-cache lookup's result, handed back to `allocate_slots`."""

    blocks: tuple[int, ...] = ()  # cached block ids for the request's first len(blocks) blocks
    num_tokens: int = 0  # len(blocks) * block_size: tokens whose K/V need no computing
    num_queried_tokens: int = 0  # tokens looked up (0 when the lookup was skipped)


class KVCacheManager:
    """Per-request block lists over a BlockPool, with automatic prefix caching.

    Args:
      num_blocks: KV-cache blocks, including the sink block 0.
      block_size: token slots per block.
      max_num_seqs: block_table rows (requests holding blocks at once).
      max_blocks_per_seq: block_table columns.
      enable_caching: automatic prefix caching; off, no lookups hit and nothing is cached.
      hash_seed: seeds the block-hash chain (hashing.root_hash).
      num_cpu_blocks: host swap pool, including its scratch block 0 (copy padding); 0: no pool.
    """

    def __init__(self, num_blocks: int, block_size: int, max_num_seqs: int, max_blocks_per_seq: int,
                 enable_caching: bool = True, hash_seed: int = DEFAULT_HASH_SEED, num_cpu_blocks: int = 0):
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.pool = BlockPool(num_blocks, enable_caching)
        # The host pool: ref counts and a free queue, never cached (BlockPool's mechanism reused).
        self.cpu_pool = BlockPool(num_cpu_blocks, enable_caching=False) if num_cpu_blocks else None
        self._cpu_blocks: dict[str, list[int]] = {}  # swapped request_id -> host block ids, logical order
        self.rows = BlockTable(max_num_seqs, max_blocks_per_seq)
        self._root = root_hash(hash_seed)
        self._blocks: dict[str, list[int]] = {}  # request_id -> block ids, logical order
        self._requests: dict[str, object] = {}  # request_id -> the Request holding those blocks
        self._num_cached: dict[str, int] = {}  # request_id -> leading blocks already offered to the cache
        self.prefix_cache_queries = 0  # tokens looked up at admissions
        self.prefix_cache_hits = 0  # of those, tokens found cached

    # -- queries --
    num_blocks = property(lambda self: self.pool.num_blocks)
    max_num_seqs = property(lambda self: self.rows.max_num_seqs)
    max_blocks_per_seq = property(lambda self: self.rows.max_blocks_per_seq)
    num_usable_blocks = property(lambda self: self.pool.num_usable_blocks)
    num_free_blocks = property(lambda self: self.pool.num_free_blocks)
    num_used_blocks = property(lambda self: self.pool.num_used_blocks)
    ref_counts = property(lambda self: self.pool.ref_counts)

    @property
    def block_table(self) -> np.ndarray:
        """[max_num_seqs, max_blocks_per_seq] int32 rows that batch preparation gathers."""
        return self.rows.block_table

    def row_of(self, request_id: str) -> int:
        return self.rows.row_of(request_id)

    @property
    def num_referenced_blocks(self) -> int:
        """Blocks the requests would hold without sharing: each block counts once per owner."""
        return int(self.ref_counts.sum())

    @property
    def usage(self) -> float:
        """Fraction of usable blocks (block 0 excluded) held by requests, in [0, 1]."""
        return self.num_used_blocks / self.num_usable_blocks

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0

    def max_tokens_per_seq(self) -> int:
        return self.max_blocks_per_seq * self.block_size

    def blocks_of(self, request_id: str) -> list[int]:
        """The request's block ids in logical order (a copy; [] if it holds none)."""
        return list(self._blocks.get(request_id, ()))

    def num_blocks_of(self, request_id: str) -> int:
        """How many blocks the request holds (no copy, unlike blocks_of)."""
        return len(self._blocks.get(request_id, ()))

    def has_blocks(self, request_id: str) -> bool:
        return request_id in self._blocks

    @property
    def num_cpu_blocks(self) -> int:
        """Usable host blocks (scratch block 0 excluded); 0 without a host pool."""
        return self.cpu_pool.num_usable_blocks if self.cpu_pool is not None else 0

    @property
    def num_free_cpu_blocks(self) -> int:
        return self.cpu_pool.num_free_blocks if self.cpu_pool is not None else 0

    def cpu_blocks_of(self, request_id: str) -> list[int]:
        """A swapped request's host block ids in logical order (a copy; [] if not swapped)."""
        return list(self._cpu_blocks.get(request_id, ()))

    def is_swapped(self, request_id: str) -> bool:
        return request_id in self._cpu_blocks

    # -- prefix cache --
    def get_computed_blocks(self, request) -> ComputedBlocks:
        """The longest run of cached full blocks at the start of the request's tokens.

        Capped at num_tokens - 1 tokens: the last token is always computed, because its logits
        sample the next token. Requests wanting prompt_logprobs skip the lookup (a cached token's
        logits are never computed); they still fill the cache. Changes nothing.
        """
        if not self.enable_caching or request.skip_reading_prefix_cache:
            return ComputedBlocks()
        hashes = update_block_hashes(request, self.block_size, self._root)
        max_blocks = (request.num_tokens - 1) // self.block_size
        hits = []
        for h in hashes[:max_blocks]:
            block = self.pool.get_cached_block(h)
            if block is None:
                break
            hits.append(block)
        return ComputedBlocks(tuple(hits), len(hits) * self.block_size, request.num_tokens)

    def cache_blocks(self, request, num_tokens: int) -> None:
        """Offer to the cache the request's blocks that are full within its first `num_tokens`
        tokens (call once their computation is scheduled for good; see the module docstring)."""
        if not self.enable_caching:
            return
        rid = request.request_id
        start = self._num_cached[rid]
        if num_tokens // self.block_size <= start:
            return  # no block became full since the last call (most decode steps)
        blocks = self._blocks[rid]
        num_full = min(num_tokens, request.num_tokens, len(blocks) * self.block_size) // self.block_size
        if num_full <= start:
            return
        hashes = update_block_hashes(request, self.block_size, self._root)
        for i in range(start, num_full):
            self.pool.cache_block(blocks[i], hashes[i])
        self._num_cached[rid] = num_full

    def reset_prefix_cache(self) -> bool:
        """Forget all cached content (e.g. after a weight update). As vLLM: False, and nothing
        changes, while any block is held by a request."""
        return self.pool.reset_prefix_cache()

    # -- allocation --
    def allocate_slots(self, request, num_new_tokens: int, new_computed_blocks: ComputedBlocks | None = None) -> bool:
        """Make the request's blocks cover its computed tokens plus `num_new_tokens` slots.

        Args:
          request: a Request; its num_computed_tokens counts tokens already in its blocks.
          num_new_tokens: tokens to compute this step, after the computed ones.
          new_computed_blocks: at admission, the lookup from `get_computed_blocks`; the request
            takes those blocks (shared) and `num_new_tokens` counts past them.
        Returns False, changing nothing, if the free blocks (counting cached free blocks the hit
        would take out of the free queue) or max_blocks_per_seq do not allow it.
        """
        rid = request.request_id
        have = self._blocks.get(rid, [])
        if new_computed_blocks is None and len(have) * self.block_size >= request.num_computed_tokens + num_new_tokens:
            return True  # the blocks it holds cover the slots (most decode steps): nothing to take
        hits = new_computed_blocks.blocks if new_computed_blocks is not None else ()
        if hits and have:
            raise ValueError(f"{rid!r} already holds blocks; computed blocks are taken at admission only")
        num_computed = request.num_computed_tokens + len(hits) * self.block_size
        num_new_blocks = max(0, cdiv(num_computed + num_new_tokens, self.block_size) - len(have) - len(hits))
        if len(have) + len(hits) + num_new_blocks > self.max_blocks_per_seq:
            return False
        # A hit on a free block takes it out of the free queue just as a new block would.
        num_free_hits = sum(1 for b in hits if self.pool.ref_counts[b] == 0)
        if num_new_blocks + num_free_hits > self.pool.num_free_blocks:
            return False
        if new_computed_blocks is not None:
            self.prefix_cache_queries += new_computed_blocks.num_queried_tokens
            self.prefix_cache_hits += new_computed_blocks.num_tokens
        if not hits and not num_new_blocks:
            return True
        if rid not in self._blocks:
            self.rows.add_row(rid)
            have = self._blocks[rid] = []
            self._requests[rid] = request
            self._num_cached[rid] = 0
        # Touch the hits first, so taking new blocks cannot evict them.
        self.pool.touch(hits)
        new = self.pool.get_new_blocks(num_new_blocks)
        have.extend(hits)
        have.extend(new)
        self.rows.append(rid, list(hits) + new)
        self._num_cached[rid] += len(hits)
        return True

    # -- swap --
    def swap_out(self, request) -> list[tuple[int, int]] | None:
        """Plan the copy of the request's computed blocks to host blocks and drop its device
        blocks (as `free`). Returns [(device block, host block)] in logical order, or None,
        changing nothing, when the host pool lacks room. Its num_computed_tokens stays.

        The copy must run before anything writes the freed device blocks, i.e. before the step's
        forward (they may go to another request in this very step).
        """
        rid = request.request_id
        n = cdiv(request.num_computed_tokens, self.block_size)
        if self.cpu_pool is None or rid in self._cpu_blocks or not 0 < n <= self.cpu_pool.num_free_blocks:
            return None
        cpu = self.cpu_pool.get_new_blocks(n)
        plan = list(zip(self._blocks[rid][:n], cpu))
        self.free(request)
        self._cpu_blocks[rid] = cpu
        return plan

    def swap_in(self, request, num_new_tokens: int) -> list[tuple[int, int]] | None:
        """Device blocks for a swapped request's computed tokens plus `num_new_tokens`, and the
        copy plan [(host block, device block)] back; the host blocks are freed. None, changing
        nothing, when the device blocks (or max_blocks_per_seq) do not allow it: a swapped request
        resumes with all its blocks or waits.

        The copy must land before the step's forward reads them. The freed host blocks are not
        reused in the same step because a step that preempts admits nobody (scheduler rule).
        """
        rid = request.request_id
        cpu = self._cpu_blocks.get(rid)
        if cpu is None:
            raise ValueError(f"{rid!r} has no swapped blocks")
        if rid in self._blocks or not self.allocate_slots(request, num_new_tokens):
            return None
        plan = list(zip(cpu, self._blocks[rid][: len(cpu)]))
        del self._cpu_blocks[rid]
        self.cpu_pool.free_blocks(reversed(cpu))
        return plan

    def free(self, request) -> None:
        """Release the request's blocks and row (no-op if it holds none). Blocks go back to the
        free queue tail-first; their cached content stays findable until evicted. A swapped
        request's host blocks are freed too."""
        rid = request.request_id
        cpu = self._cpu_blocks.pop(rid, None)
        if cpu is not None:
            self.cpu_pool.free_blocks(reversed(cpu))
        blocks = self._blocks.pop(rid, None)
        if blocks is None:
            return
        del self._requests[rid]
        num_cached = self._num_cached.pop(rid)
        # Cached at scheduling but never computed (it left between schedule and update).
        for i in range(request.num_computed_tokens // self.block_size, num_cached):
            self.pool.uncache_block(blocks[i])
        self.pool.free_blocks(reversed(blocks))
        self.rows.remove_row(rid)

    # -- checking --
    def check_invariants(self) -> None:
        """Raise AssertionError describing the first inconsistency found."""
        owners = np.zeros(self.num_blocks, dtype=np.int64)
        for rid, blocks in self._blocks.items():
            assert blocks, f"{rid!r} has an empty block list (should have been dropped)"
            assert len(set(blocks)) == len(blocks), f"{rid!r} owns a block twice: {blocks}"
            assert len(blocks) <= self.max_blocks_per_seq, f"{rid!r} owns {len(blocks)} > max_blocks_per_seq"
            for b in blocks:
                assert 0 < b < self.num_blocks, f"{rid!r} owns invalid block {b}"
                owners[b] += 1
        self.pool.check_invariants(owners)
        self.rows.check_invariants(self._blocks)
        assert self.cpu_pool is not None or not self._cpu_blocks, "swapped blocks without a host pool"
        if self.cpu_pool is not None:
            cpu_owners = np.zeros(self.cpu_pool.num_blocks, dtype=np.int64)
            for rid, cpu in self._cpu_blocks.items():
                assert cpu and rid not in self._blocks, f"{rid!r} is swapped and holds device blocks: {cpu}"
                for b in cpu:
                    assert 0 < b < self.cpu_pool.num_blocks, f"{rid!r} owns invalid host block {b}"
                    cpu_owners[b] += 1
            assert cpu_owners.max(initial=0) <= 1, "a host block has two owners"
            self.cpu_pool.check_invariants(cpu_owners)
        # A held block cached under a hash must hold that content: the owner's block at that
        # position has the same chained hash. This catches a block reused for other tokens while
        # its old hash still names it.
        for rid, blocks in self._blocks.items():
            req = self._requests[rid]
            assert self._num_cached[rid] <= len(blocks), f"{rid!r} cached more blocks than it holds"
            for i, b in enumerate(blocks):
                h = self.pool.block_hashes[b]
                if h is not None:
                    assert i < len(req.block_hashes) and req.block_hashes[i] == h, (
                        f"block {b} is cached under a hash that is not {rid!r}'s block {i}: stale content"
                    )

    def __repr__(self) -> str:
        return (
            f"KVCacheManager(num_blocks={self.num_blocks}, block_size={self.block_size}, "
            f"free={self.num_free_blocks}, cached={self.pool.num_cached_blocks}, requests={len(self._blocks)})"
        )
