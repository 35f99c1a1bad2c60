"""One pipeline tick under shard_map: stage s runs micro-batch t - s, activations move on by ppermute.

    out, kv_caches, carry = tick(params, kv_caches, carry, stage_inputs, logits_indices,
                                 sampling_inputs, prompt_targets, config=..., plan=..., ...)

shard_map is manual over "pp" only (axis_names={"pp"}): inside, each stage sees its own row of
every [P, ...] array, and "tp" stays automatic, so a stage's layers run the ordinary
llama.decoder_layer on tensor-parallel weights and GSPMD inserts the same all-reduces as in plain
tensor parallelism. Per tick a stage:

  1. takes its input: stage 0 embeds its micro-batch's tokens, stage s > 0 reads carry row s (the
     hidden states stage s - 1 produced last tick) [T, H];
  2. runs its layers_per_stage slots; a padding slot (partition.py) is masked out by jnp.where;
     each slot writes its K/V with this stage's own slot mapping (micro-batch t - s's). Slot j
     is a different model layer per stage: where their static facts differ (Gemma 3's sliding
     vs global layers) the slot's RoPE table and attention are a lax.switch on the stage over
     its variants (slot_variants, layers.per_layer); the projections, the KV write and the tp
     collectives stay outside the switch, so no branch holds a collective or copies a cache;
  3. sends its output to stage s + 1 with one ppermute of [T, H] (the only cross-stage traffic
     besides the sampled tokens);
  4. the last stage applies the final norm and the LM head and samples micro-batch t - (P-1);
     its StepOutputs reach every device by a psum over "pp" of values that are zero elsewhere
     (a broadcast of [S] tokens/logprobs: every host reads the tokens, as in multi-host TP).

Every stage also computes step 4 on its own (meaningless) hidden states: SPMD runs one program,
and a branch on the stage index would put GSPMD's tp collectives under a per-device cond. That
costs one LM head per stage per tick (see experiments/inspect_pipeline.py's cost model).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxllm.attention.metadata import AttentionMetadata
from jaxllm.models import layers, llama
from jaxllm.parallel.pipeline import KV_STAGE_SPEC, PP_AXIS, carry_sharding, kv_sharding, slot_variants
from jaxllm.runner.step_io import StepOutputs


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StageInputs:
    """Each stage's micro-batch this tick (row s: stage s's); sharded over "pp"."""

    token_ids: jax.Array  # [P, T] int32 (read by stage 0 only)
    positions: jax.Array  # [P, T] int32
    metadata: AttentionMetadata  # [P, T] slot_mapping, [P, S, B] block_tables, [P, S] kv_lens, [P, S+1] cu_q_lens


def pipeline_tick(params, kv_caches, carry, stage_inputs: StageInputs, logits_indices, sampling_inputs,
                  prompt_targets, *, config, plan, attention_fn, sampler: str, prompt_logprobs: bool, mesh):
    """See the module docstring. Shapes: kv_caches [(K, V)] per local slot, each [num_blocks,
    block_size, P * nKV, D] (pipeline.kv_cache_shape); carry [P, T_max, H]; logits_indices [S],
    sampling_inputs [S, ...] and prompt_targets [T] belong to the last stage's micro-batch
    (replicated).
    Returns (StepOutputs replicated, kv_caches, carry)."""
    from jaxllm.runner.runner import make_paged_attention, sample_outputs

    num_stages = plan.num_stages
    t = stage_inputs.token_ids.shape[1]
    head_config = dataclasses.replace(config, tie_word_embeddings=True)  # the table is [V, H]

    def body(params, kv_caches, carry, inputs, logits_indices, sampling_inputs, prompt_targets):
        stage = jax.lax.axis_index(PP_AXIS)
        inputs = jax.tree.map(lambda a: a[0], inputs)
        table = params["vocab"][0]  # embedding on stage 0, LM head on the last stage
        x = jnp.where(stage == 0, llama.embed(table, config, inputs.token_ids), carry[0, :t])
        attention = make_paged_attention(config, inputs.metadata, attention_fn)
        num_real = jnp.asarray(plan.counts, jnp.int32)[stage]
        new_caches = []
        for j, (lp, (k, v), (reps, kinds)) in enumerate(zip(params["layers"], kv_caches, slot_variants(config, plan))):
            lp = jax.tree.map(lambda a: a[0], lp)
            # Slot j is layer reps[kinds[s]] on stage s: one variant per distinct layer signature,
            # chosen on the device where the layer reads its RoPE and window (layers.per_layer).
            layer = reps[0] if len(reps) == 1 else layers.LayerChoice(jnp.asarray(kinds, jnp.int32)[stage], reps)
            # k, v: this stage's [num_blocks, block_size, nKV, D] (pipeline.kv_cache_shape), written
            # as they are; a [1, ...] stage axis squeezed here and restored made XLA copy them.
            y, kv = llama.decoder_layer(lp, config, x, inputs.positions, layer, (k, v), attention)
            x = jnp.where(j < num_real, y, x)  # padding slot: identity
            new_caches.append(kv)
        hidden = llama.final_norm(params["final_norm"], config, x)
        out = sample_outputs({"embed": table}, head_config, hidden, logits_indices, sampling_inputs,
                             prompt_targets, sampler=sampler, prompt_logprobs=prompt_logprobs)
        last = stage == num_stages - 1
        out = jax.tree.map(lambda a: jax.lax.psum(jnp.where(last, a, jnp.zeros_like(a)), PP_AXIS), out)
        sent = jax.lax.ppermute(x, PP_AXIS, [(i, i + 1) for i in range(num_stages - 1)])
        new_carry = jax.lax.dynamic_update_slice(jnp.zeros_like(carry[0]), sent, (0, 0))
        return out, new_caches, new_carry[None]

    pp = P(PP_AXIS)
    param_specs = {"layers": pp, "vocab": pp, "final_norm": P()}
    return jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(param_specs, KV_STAGE_SPEC, pp, pp, P(), P(), P()),
        out_specs=(P(), KV_STAGE_SPEC, pp),
        axis_names={PP_AXIS},
        # jnp.searchsorted (reference attention) trips jax 0.10's varying-axis checker under a
        # partially manual shard_map; the psum / ppermute below are the only cross-stage ops.
        check_vma=False,
    )(params, kv_caches, carry, stage_inputs, logits_indices, sampling_inputs, prompt_targets)


_TICKS: dict = {}  # (mesh, layers_per_stage) -> jitted tick, shared by runners (as runner._STEP_FUNCTIONS)


def tick_function(mesh, layers_per_stage: int):
    """The jitted tick for this mesh: KV caches and carry donated, outputs replicated."""
    key = (mesh, layers_per_stage)
    fn = _TICKS.get(key)
    if fn is None:
        kv = kv_sharding(mesh)
        fn = _TICKS[key] = jax.jit(
            functools.partial(pipeline_tick, mesh=mesh),
            static_argnames=("config", "plan", "attention_fn", "sampler", "prompt_logprobs"),
            donate_argnames=("kv_caches", "carry"),
            out_shardings=(NamedSharding(mesh, P()), [(kv, kv)] * layers_per_stage, carry_sharding(mesh)),
        )
    return fn
