"""Chained block hashes for automatic prefix caching. Host only (no jax).

A full block's hash is SHA-256 over a canonical byte encoding of
    (parent hash, the block's token ids, extra keys)
where the parent of block 0 is a root hash derived from a seed. Chaining makes a block's hash
name its whole prefix, so a hit on block i implies hits on blocks 0..i-1 were the same tokens.
Extra keys carry what besides the tokens decides the block's K/V; today that is the request's
optional `cache_salt`, put into block 0 only (the chain carries it to every later block), so two
salts never share a block. Only full blocks are hashed: a partial block's content still changes.

Why not Python's `hash()`: it is salted per process for str (PYTHONHASHSEED) and collides by
design for ints (hash(-1) == hash(-2)); a collision here would silently serve another prompt's K/V.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

import numpy as np

BlockHash = bytes  # a 32-byte SHA-256 digest
DEFAULT_HASH_SEED = 0  # fixed, so hashes are reproducible across processes and runs
_DOMAIN = b"jaxllm.prefix_cache.v1\0"


def root_hash(seed: int = DEFAULT_HASH_SEED) -> BlockHash:
    """The parent hash of every request's first block. Different seeds share no block hash."""
    return hashlib.sha256(_DOMAIN + _encode_key(int(seed))).digest()


def _encode_key(key) -> bytes:
    """Tagged, length-prefixed encoding: ("ab", "c") and ("a", "bc") encode differently."""
    if isinstance(key, str):
        tag, data = b"s", key.encode("utf-8")
    elif isinstance(key, bytes):
        tag, data = b"b", key
    elif isinstance(key, bool) or key is None:  # before int: bool is an int subclass
        tag, data = b"o", repr(key).encode()
    elif isinstance(key, (int, np.integer)):
        tag, data = b"i", str(int(key)).encode()
    else:
        raise TypeError(f"extra keys must be str, bytes, int, bool or None, got {type(key).__name__}")
    return tag + struct.pack("<Q", len(data)) + data


def hash_block_tokens(parent: BlockHash, token_ids: Sequence[int], extra_keys: tuple = ()) -> BlockHash:
    """SHA-256 of (parent [32 bytes], token ids [n] as int64 little-endian, extra keys)."""
    h = hashlib.sha256(parent)
    tokens = np.asarray(token_ids, dtype="<i8")
    h.update(struct.pack("<Q", tokens.size))
    h.update(tokens.tobytes())
    h.update(struct.pack("<Q", len(extra_keys)))
    for key in extra_keys:
        h.update(_encode_key(key))
    return h.digest()


def block_extra_keys(request, block_index: int) -> tuple:
    """Extra keys of one block: the cache salt, on block 0 only (the chain carries it on)."""
    salt = getattr(request, "cache_salt", None)
    if block_index == 0 and salt is not None:
        return ("cache_salt", salt)
    return ()


def update_block_hashes(request, block_size: int, root: BlockHash) -> list[BlockHash]:
    """Extend `request.block_hashes` to one hash per full block of its tokens; return the list.

    Incremental: only blocks that became full since the last call are hashed, and tokens are
    sliced from the prompt / output lists directly (no concatenation of the whole sequence).
    The list belongs to the KV-cache manager that calls this (its block_size and seed).
    """
    hashes = request.block_hashes
    prompt, outputs = request.prompt_token_ids, request.output_token_ids
    num_full = (len(prompt) + len(outputs)) // block_size
    parent = hashes[-1] if hashes else root
    for i in range(len(hashes), num_full):
        lo, hi = i * block_size, (i + 1) * block_size
        if hi <= len(prompt):
            tokens = prompt[lo:hi]
        else:
            n = len(prompt)
            tokens = prompt[lo:n] + outputs[max(0, lo - n) : hi - n]
        parent = hash_block_tokens(parent, tokens, block_extra_keys(request, i))
        hashes.append(parent)
    return hashes
