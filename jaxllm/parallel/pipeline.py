"""Pipeline parallelism: the ("pp", "tp") mesh, what P and T must satisfy, and stage placement.

    mesh = make_pp_mesh(P, T)                         # devices[:P*T] as a [P, T] grid
    plan = validate_pp(model_config, P, T, partition) # StagePlan, before anything is loaded
    params = place_stage_params(host_params, model_config, mesh, plan)
    kv = kv_sharding(mesh)                            # one slot's K or V: kv_cache_shape(P, ...)

Layout. Stage s is row s of the mesh: its T devices hold only its layers, tensor-parallel among
themselves exactly as jaxllm/parallel/rules.py shards a whole model over "tp". SPMD needs uniform
shapes, so per-layer weights are stacked by *local slot*: params["layers"][j][name] has global
shape [P, *shape] sharded P("pp", *tp_spec), and row s holds the weight of model layer
offsets[s] + j (zeros in a padding slot, see partition.py). The KV cache has one (K, V) pair
per slot too, but with the stage folded into the head axis: each [num_blocks, block_size,
P * nKV, D] sharded P(None, None, ("pp", "tp"), None), heads s * nKV .. (s + 1) * nKV - 1 being
stage s's (kv_cache_shape). A device holds the cache of its own stage's layers and its own KV
heads only, and inside the tick's shard_map its block is exactly the [num_blocks, block_size,
nKV, D] cache a layer writes: no reshape around the KV write. A leading [P] stage axis instead
made XLA copy the whole cache around each write whenever T > 1 or a slot switches its layer
variant (8-12 whole-cache copies per tick at 2x2, 2x4 and Gemma 3 2x2; none now). The block axis
leads as in ModelRunner's caches, so its swap copies serve the pipeline unchanged. One block
manager and one set of block tables drive every stage: block b is block b on each of them.

Vocabulary tables. The embedding is used by stage 0 and the LM head by stage P - 1 only. They
share one stacked slot params["vocab"] [P, V, H] (vocab-parallel over "tp" when T divides V):
row 0 is the embedding, row P - 1 the LM head transposed to [V, H] (the embedding again when
tied), middle rows zeros. Every device therefore holds one V x H / T table, so parameter bytes
are balanced: per device = (layers_per_stage layers + one table) / T. Against an ideal 1/(P*T)
of the model, a first/last-stage device is over by (P - 2) tables / (P*T) (none at P = 2) and a
middle one holds a zero table it never reads (SPMD cannot give it a smaller array).
final_norm ([H]) is replicated.
"""

from __future__ import annotations

import numpy as np
import jax
import jax.numpy as jnp
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from jaxllm.parallel.mesh import TP_AXIS, pick_devices, validate_tp
from jaxllm.parallel.partition import StagePlan
from jaxllm.parallel.rules import kv_head_replicas, partition_spec, tp_model_config

PP_AXIS = "pp"
_KV_LEAVES = ("k_proj", "v_proj", "k_bias", "v_bias")


def make_pp_mesh(pipeline_parallel_size: int, tensor_parallel_size: int, devices=None) -> Mesh:
    """A [P, T] Mesh with axes ("pp", "tp"): stage s is row s. In a multi-host run jax.devices()
    is ordered by process, so consecutive stages sit on consecutive hosts when T divides the
    devices per host (the activation transfer between stages is then the only cross-host traffic
    whenever a host holds whole stages)."""
    p, t = pipeline_parallel_size, tensor_parallel_size
    chosen = pick_devices(p * t, f"pipeline_parallel_size={p} x tensor_parallel_size={t} = {p * t} devices", devices)
    return Mesh(np.asarray(chosen).reshape(p, t), (PP_AXIS, TP_AXIS), axis_types=(AxisType.Auto,) * 2)


def validate_pp(config, pipeline_parallel_size: int, tensor_parallel_size: int, partition=None) -> StagePlan:
    """The StagePlan, or ValueError naming the values (P > num_layers, a partition of the wrong
    length or sum, a T that cannot shard the model). Layers may differ in RoPE and sliding window
    (Gemma 3): the tick picks each slot's variant per stage (slot_variants)."""
    plan = StagePlan.build(config.num_layers, pipeline_parallel_size, partition)
    validate_tp(config, tensor_parallel_size)
    return plan


def slot_variants(config, plan: StagePlan) -> tuple[tuple[tuple[int, ...], tuple[int, ...]], ...]:
    """Per local slot j, (reps, kinds): the tick runs slot j of every stage with one program, but
    the global layer in slot j differs per stage, and so may its static facts (RoPE, sliding
    window: the model's layer_signature; Gemma 3 alternates local and global layers). reps are
    one global layer per distinct signature among slot j's real layers (in stage order), the
    static layer_idx of that variant; kinds[s] indexes reps for stage s (0 for a padding slot,
    which the tick masks out). A slot with one signature (every slot of a uniform model, and of
    Gemma 3 when the stage length is a multiple of its pattern) has reps of length 1: no branch."""
    from jaxllm.models import registry

    signature = registry.get_model_module(config.architecture).layer_signature
    out = []
    for j in range(plan.layers_per_stage):
        reps, kinds, index = [], [], {}
        for s in range(plan.num_stages):
            layer = plan.global_layer(s, j)
            if layer is None:
                kinds.append(0)
                continue
            key = signature(config, layer)
            if key not in index:
                index[key] = len(reps)
                reps.append(layer)
            kinds.append(index[key])
        out.append((tuple(reps), tuple(kinds)))
    return tuple(out)


def _stacked(shape, sharding, per_stage) -> jax.Array:
    """A [P, *shape] global array whose row s is per_stage(s) (numpy); each process builds only its
    own devices' shards (multi-host safe)."""
    cache: dict[int, np.ndarray] = {}

    def shard(idx):
        s = idx[0].start or 0
        if s not in cache:
            cache[s] = per_stage(s)
        return cache[s][None][(slice(None),) + tuple(idx[1:])]

    return jax.make_array_from_callback((sharding.mesh.shape[PP_AXIS], *shape), sharding, shard)


def stage_specs(config, mesh: Mesh, dtype):
    """ParamSpecs of one layer and of the embedding for the tp-expanded model on `mesh`."""
    from jaxllm.models import weights

    return weights.param_specs(tp_model_config(config, mesh.shape[TP_AXIS]), dtype)


def stage_layout(config, mesh: Mesh, plan: StagePlan, dtype) -> dict:
    """The stacked tree's leaves as jax.ShapeDtypeStruct (global shape, dtype, sharding):
    {"layers": [slot j: {name: [P, ...]}], "vocab": [P, V, H], "final_norm": [H]}."""
    specs = stage_specs(config, mesh, jnp.dtype(dtype))
    p = plan.num_stages

    def stacked(spec):
        sharding = NamedSharding(mesh, P(PP_AXIS, *partition_spec(spec, mesh)))
        return jax.ShapeDtypeStruct((p, *spec.shape), spec.dtype, sharding=sharding)

    norm = specs["final_norm"]
    return {
        "layers": [{name: stacked(spec) for name, spec in specs["layers"][0].items()}
                   for _ in range(plan.layers_per_stage)],
        "vocab": stacked(specs["embed"]),
        "final_norm": jax.ShapeDtypeStruct(norm.shape, norm.dtype, sharding=NamedSharding(mesh, P())),
    }


def place_stage_params(host_params: dict, config, mesh: Mesh, plan: StagePlan) -> dict:
    """Canonical params (numpy, or arrays on any device) -> the stacked per-stage layout above
    (stage_layout)."""
    from jaxllm.parallel.params import expand_kv_heads

    r = kv_head_replicas(config, mesh.shape[TP_AXIS])
    dtype = np.asarray(host_params["embed"]).dtype
    layout = stage_layout(config, mesh, plan, dtype)

    def host_leaf(layer: int, name: str) -> np.ndarray:
        a = np.asarray(host_params["layers"][layer][name])
        if name in _KV_LEAVES and r > 1:
            a = expand_kv_heads(a, a.ndim - 1, config.head_dim, r)
        return a

    def build(leaf, per_stage):
        return _stacked(leaf.shape[1:], leaf.sharding, per_stage)

    def layer_row(name, j):
        def per_stage(s):
            layer = plan.global_layer(s, j)
            if layer is None:  # padding slot: masked, never used
                return np.zeros(layout["layers"][j][name].shape[1:], dtype)
            return host_leaf(layer, name)
        return per_stage

    last = plan.num_stages - 1

    def vocab_row(s):
        if s == 0:
            return np.asarray(host_params["embed"])
        if s == last:
            head = host_params.get("lm_head")
            return np.asarray(host_params["embed"]) if head is None else np.ascontiguousarray(np.asarray(head).T)
        return np.zeros(layout["vocab"].shape[1:], dtype)  # a middle stage's unused table (module docstring)

    norm = np.asarray(host_params["final_norm"])
    return {
        "layers": [{name: build(leaf, layer_row(name, j)) for name, leaf in slot.items()}
                   for j, slot in enumerate(layout["layers"])],
        "vocab": build(layout["vocab"], vocab_row),
        "final_norm": jax.make_array_from_callback(norm.shape, layout["final_norm"].sharding, lambda idx: norm[idx]),
    }


def kv_cache_shape(num_stages: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int):
    """One slot's K or V cache: [num_blocks, block_size, P * nKV, D], stage s's heads at s * nKV
    (nKV: the tp-expanded model's KV heads, tp_model_config)."""
    return (num_blocks, block_size, num_stages * num_kv_heads, head_dim)


# The cache's head axis split over stages, then over each stage's tp devices; inside the tick
# (manual over "pp") a stage sees its own nKV heads, still sharded over "tp".
KV_STAGE_SPEC = P(None, None, PP_AXIS, None)


def kv_sharding(mesh: Mesh) -> NamedSharding:
    """One slot's K or V cache (kv_cache_shape): each device holds [num_blocks, block_size,
    nKV / T, D], its stage's layer slot and its own KV heads."""
    return NamedSharding(mesh, P(None, None, (PP_AXIS, TP_AXIS), None))


def carry_sharding(mesh: Mesh) -> NamedSharding:
    """The activations between stages [P, T_max, H]: row s is what stage s reads next tick."""
    return NamedSharding(mesh, P(PP_AXIS))


def stage_sharding(mesh: Mesh) -> NamedSharding:
    """Per-stage step inputs [P, ...]: row s is the micro-batch stage s runs this tick."""
    return NamedSharding(mesh, P(PP_AXIS))


def load_for_pipeline(engine_config, model=None):
    """(mesh, StagePlan, Model with host numpy params) for an EngineConfig with
    pipeline_parallel_size > 1. P, T and the partition are checked against the model's config
    (read from config.json) before any weight is read; the weights are read into host memory and
    placed per stage by the PipelineRunner (no device ever holds the whole model)."""
    import os

    from jaxllm.models.loader import load_config, load_model

    par = engine_config.parallel
    p, t = par.pipeline_parallel_size, par.tensor_parallel_size

    def check(model_config):
        return validate_pp(model_config, p, t, par.pipeline_layer_partition)

    path = engine_config.model
    if model is not None:
        plan = check(model.config)
    elif os.path.isdir(path) and os.path.exists(os.path.join(path, "config.json")):
        plan = check(load_config(path))
    else:
        plan = None  # GGUF: the config comes with the weights
    mesh = make_pp_mesh(p, t)
    if model is None:
        model = load_model(path, dtype=engine_config.dtype, place=lambda spec, a: np.asarray(a).astype(spec.dtype))
    return mesh, plan or check(model.config), model
