"""Projection weights packed for the CPU matmul kernel (jaxllm/models/matmul.cc).

EngineConfig.matmul_backend="cpu" (the default "auto" on one CPU device with f32 weights) has the
runner replace each decoder layer's projection weights w [IN, OUT], and the LM head, by a
PackedWeight: the same numbers in panels of `panel_width()` columns, [P, IN, panel] with
P = ceil(OUT / panel) and the last panel's spare columns zero, so the kernel reads every weight
sequentially. layers.linear and llama.compute_logits call `packed_matmul` for a PackedWeight,
llama.embed reads a packed tied table with `embedding_rows`; nothing else in the model changes.

Measured on this 2-core VM (30 SmolLM2-shaped layers of projections, best of 15, one process;
the README has the table): 1.2-1.35x XLA's dots at 3-77 rows, 1.06x at 512.

`packed_matmul_reference` is the jnp twin (unpack, then a dot): other platforms lower to it, and
the tests compare the two.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
from jax import lax

from jaxllm.ffi_build import FfiKernel

# The projections of a decoder layer that are packed (the norms, biases and embedding are not).
PACKED_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

_KERNEL = FfiKernel(os.path.join(os.path.dirname(os.path.abspath(__file__)), "matmul.cc"),
                    "jaxllm_matmul_packed_f32", "JaxllmMatmulPackedF32", extra_flags=("-ffp-contract=fast",))


def available() -> bool:
    """Build (or find) and register the kernel once per process; False if that is impossible."""
    return _KERNEL.available()


def unavailable_reason() -> str:
    return _KERNEL.unavailable_reason()


def panel_width() -> int:
    """Columns per packed panel of this machine's build (48 with AVX-512, 24 otherwise)."""
    if not available():
        raise RuntimeError(f"the CPU matmul kernel is unavailable: {unavailable_reason()}")
    return int(_KERNEL.library.JaxllmMatmulPanelWidth())


@dataclasses.dataclass(frozen=True)
class PackedWeight:
    """w [IN, OUT] packed: panels [P, IN, panel] f32, column p * panel + j of w in panels[p, :, j].

    transposed: the param this replaces is w.T [OUT, IN] (a tied embedding table [V, H], whose
    rows `embedding_rows` reads back out of the panels); `unpack_params` returns it that way."""

    panels: jax.Array  # [P, IN, panel] float32
    out_features: int  # OUT (static): the last panel's columns past it are zero padding
    transposed: bool = False


jax.tree_util.register_dataclass(PackedWeight, data_fields=["panels"], meta_fields=["out_features", "transposed"])


def pack(w: jax.Array, panel: int | None = None, transposed: bool = False) -> PackedWeight:
    """w [IN, OUT] f32 (transposed: w is [OUT, IN], an embedding table) -> PackedWeight (on w's
    device). panel: columns per panel (default this machine's build)."""
    panel = panel or panel_width()
    w = w.T if transposed else w
    k, n = w.shape
    num_panels = -(-n // panel)
    padded = jnp.pad(w.astype(jnp.float32), ((0, 0), (0, num_panels * panel - n)))
    return PackedWeight(jnp.transpose(padded.reshape(k, num_panels, panel), (1, 0, 2)), n, transposed)


def embedding_rows(w: PackedWeight, ids: jax.Array) -> jax.Array:
    """Rows `ids` [T] int of the table w packs (transposed: column v of the packed w is row v of
    the table [V, H]) -> [T, H] f32: a gather of H floats a panel apart per id."""
    panel = w.panels.shape[2]
    return w.panels[ids // panel, :, ids % panel]


def unpack(w: PackedWeight) -> jax.Array:
    """PackedWeight -> w [IN, OUT] f32 (the inverse of `pack`)."""
    p, k, panel = w.panels.shape
    return jnp.transpose(w.panels, (1, 0, 2)).reshape(k, p * panel)[:, : w.out_features]


def packed_matmul_reference(x: jax.Array, w: PackedWeight) -> jax.Array:
    """x [M, IN] f32 @ w -> [M, OUT] f32 in jnp (the kernel's twin)."""
    return jnp.matmul(x, unpack(w), preferred_element_type=jnp.float32)


def _kernel_matmul(x: jax.Array, panels: jax.Array, out_features: int) -> jax.Array:
    call = jax.ffi.ffi_call(_KERNEL.target, jax.ShapeDtypeStruct((x.shape[0], out_features), jnp.float32))
    return call(x, panels)


def packed_matmul(x: jax.Array, w: PackedWeight) -> jax.Array:
    """x [..., IN] f32 @ w -> [..., OUT] f32: the kernel on the CPU, the reference elsewhere."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
    if not available():
        out = packed_matmul_reference(x2, w)
    else:
        out = lax.platform_dependent(
            x2, w.panels,
            cpu=lambda a, p: _kernel_matmul(a, p, w.out_features),
            default=lambda a, p: packed_matmul_reference(a, PackedWeight(p, w.out_features)))
    return out.reshape(*lead, w.out_features)


def pack_params(params: dict) -> dict:
    """The params pytree with every decoder layer's projections packed (PACKED_PROJECTIONS) and
    the LM head: "lm_head" [H, V], or when the embeddings are tied (no "lm_head") the table
    "embed" [V, H] itself, packed transposed; lookups then read it out of the panels (one copy,
    not two). Everything else is shared with `params`. Packs on the weights' devices."""
    pack_jit = jax.jit(pack, static_argnums=(1, 2))
    panel = panel_width()
    layers = [{name: pack_jit(w, panel) if name in PACKED_PROJECTIONS else w for name, w in lp.items()}
              for lp in params["layers"]]
    out = {**params, "layers": layers}
    if "lm_head" in params:
        out["lm_head"] = pack_jit(params["lm_head"], panel)
    else:
        out["embed"] = pack_jit(params["embed"], panel, True)
    return out


def unpack_params(params: dict) -> dict:
    """The inverse of `pack_params` (checkpoints are written unpacked)."""
    def plain(w):
        if not isinstance(w, PackedWeight):
            return w
        return unpack(w).T if w.transposed else unpack(w)

    return jax.tree.map(plain, params, is_leaf=lambda w: isinstance(w, PackedWeight))
