"""Device side of async scheduling (EngineConfig.async_scheduling): a step's rows whose input is
the previous step's sampled token, which the host has not read yet, take it on the device.

    previous = pad_rows(outputs.token_ids)                 # [S] -> [R], after every step
    token_ids = resolve_token_ids(host_ids, take_index, previous)  # before the embedding

R = max_num_seqs, so `previous` has one shape whatever the previous step's bucket: resolve
compiles once per token bucket T and pad_rows once per row count S (warm-up runs both).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def resolve_token_ids(token_ids, take_index, previous):
    """token_ids [T] int32 (the host's tokens, 0 where unknown), take_index [T] int32 (the row
    of `previous` feeding each token, -1: keep the host's), previous [R] int32 -> [T] int32."""
    return jnp.where(take_index >= 0, previous[jnp.maximum(take_index, 0)], token_ids)


def pad_rows(token_ids, *, num_rows: int):
    """A step's sampled tokens [S] int32 -> [num_rows] int32 (zeros after row S)."""
    return jnp.pad(token_ids, (0, num_rows - token_ids.shape[0]))


@functools.lru_cache(maxsize=None)
def async_token_functions(sharding, num_rows: int):
    """(resolve, pad) jitted with committed outputs on `sharding`: the embedding then always
    sees the same kind of token array, so it compiles once per bucket."""
    resolve = jax.jit(resolve_token_ids, out_shardings=sharding)
    pad = jax.jit(functools.partial(pad_rows, num_rows=num_rows), out_shardings=sharding)
    return resolve, pad
