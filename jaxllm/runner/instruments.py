"""Device side of the research instruments (host side and semantics: runner/instrument_inputs.py).

`residual_hook` is the model forward's hook of an instrumented step: it records the residual at
every hidden-state index and adds each row's intervention; `gather_hidden_states` then picks only
the asked (layer, token) pairs, so only those cross to the host.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def residual_hook(residual_add: jax.Array, cu_q_lens: jax.Array, num_tokens: int):
    """(hook for llama.forward, list the hook fills with the L + 1 residuals [T, H]).

    residual_add: [L, S, H]; token t of row s gets residual_add[l, s] at the input of layer l,
    after that input was recorded (transformers' hidden_states[l] with a forward pre-hook on
    layer l). Padding tokens take the last row's vector: their outputs are never read and their
    K/V go to the sink block.
    """
    num_rows = residual_add.shape[1]
    row = jnp.searchsorted(cu_q_lens[1:], jnp.arange(num_tokens, dtype=jnp.int32), side="right")
    row = jnp.minimum(row, num_rows - 1)  # [T]
    recorded: list[jax.Array] = []

    def hook(layer: int, x: jax.Array) -> jax.Array:
        recorded.append(x)
        if layer < residual_add.shape[0]:
            x = x + residual_add[layer][row].astype(x.dtype)
        return x

    return hook, recorded


@jax.jit
def gather_hidden_states(residuals: jax.Array, layers: jax.Array, tokens: jax.Array) -> jax.Array:
    """residuals [L + 1, T, H], layers / tokens [R] int32 -> [R, H] float32."""
    return residuals[layers, tokens].astype(jnp.float32)
