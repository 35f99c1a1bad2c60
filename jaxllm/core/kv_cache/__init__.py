"""The KV-cache manager, in three pieces (host only, never imports jax):

  block_pool.py   ref counts, the LRU free queue of possibly cached blocks, hash -> block
  hashing.py      chained SHA-256 block hashes with extra keys (cache_salt)
  manager.py      per-request blocks, prefix-cache lookups, slot allocation, free
  block_table.py  the device-facing [max_num_seqs, max_blocks_per_seq] rows
"""

from jaxllm.core.kv_cache.block_pool import BlockPool
from jaxllm.core.kv_cache.block_table import BlockTable
from jaxllm.core.kv_cache.hashing import DEFAULT_HASH_SEED, hash_block_tokens, root_hash, update_block_hashes
from jaxllm.core.kv_cache.manager import ComputedBlocks, KVCacheManager, cdiv

__all__ = [
    "BlockPool",
    "BlockTable",
    "ComputedBlocks",
    "DEFAULT_HASH_SEED",
    "KVCacheManager",
    "cdiv",
    "hash_block_tokens",
    "root_hash",
    "update_block_hashes",
]
