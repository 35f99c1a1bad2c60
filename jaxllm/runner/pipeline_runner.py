"""PipelineRunner: the device side of a pipeline-parallel engine (jaxllm/parallel/pipeline.py).

    outputs = runner.run_tick(window)   # window[s]: StepInputs stage s runs (None: a bubble);
                                        # returns window[P-1]'s StepOutputs (None for a bubble)
    pending = runner.dispatch_tick(window); ...; outputs = runner.fetch_outputs(pending)  # async
    outputs = runner.execute(step)      # ModelRunner's contract: one batch through all P stages

The engine's batch queue (jaxllm/core/batch_queue.py) owns which micro-batch is at which stage;
the runner is stateless about that and keeps only device state: stage-placed params, each stage's
KV cache, and the activations in transit between stages (`carry`, [P, T_max, H], donated).

All micro-batches of one tick run padded to one shape: T = the largest token bucket among them
(S = min(T, max_num_seqs), as batch.padded_shape), so the tick compiles once per token bucket and
sampler variant, like the ModelRunner's step. Padding tokens write into sink block 0.
It reuses ModelRunner's neutral sampling arrays and counters, and its swap preemption: the host
pool is one (K, V) pair per local layer slot, each [num_cpu_blocks, block_size, P * nKV, D] in
pinned_host memory with the KV cache's sharding (pipeline.kv_cache_shape), so each stage's host
memory holds its own layers' swapped blocks. Block ids mean the same on every stage and lead both
layouts, so ModelRunner.swap's one plan copies every stage's blocks at once.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.attention.metadata import AttentionMetadata
from jaxllm.parallel import pipeline
from jaxllm.parallel.pipeline_tick import StageInputs, tick_function
from jaxllm.parallel.rules import tp_model_config
from jaxllm.parallel.runtime import to_global
from jaxllm.parallel.mesh import TP_AXIS
from jaxllm.runner import compile_cache
from jaxllm.runner import runner as runner_mod
from jaxllm.runner.batch import BatchInputs, prepare_batch
from jaxllm.runner.runner import ModelRunner, attention_impl, attention_run, resolve_attention_backend
from jaxllm.runner.sampling_inputs import GREEDY, SamplingInputs, build_sampling_inputs
from jaxllm.runner.step_io import StepInputs, StepOutputs


def repad_batch(batch: BatchInputs, t: int, s: int) -> BatchInputs:
    """`batch` padded further to T=t tokens and S=s rows (padding tokens -> sink slot 0, padding
    rows empty), so micro-batches of different buckets can share one tick."""
    dt, ds = t - batch.padded_num_tokens, s - batch.padded_num_seqs
    if dt < 0 or ds < 0:
        raise ValueError(f"cannot pad a batch of T={batch.padded_num_tokens}, S={batch.padded_num_seqs} to T={t}, S={s}")
    if dt == 0 and ds == 0:
        return batch
    tok = lambda a: np.pad(a, (0, dt))  # noqa: E731
    return dataclasses.replace(
        batch,
        token_ids=tok(batch.token_ids), positions=tok(batch.positions), slot_mapping=tok(batch.slot_mapping),
        block_tables=np.pad(batch.block_tables, ((0, ds), (0, 0))),
        kv_lens=np.pad(batch.kv_lens, (0, ds)),
        cu_q_lens=np.pad(batch.cu_q_lens, (0, ds), mode="edge"),
        logits_indices=np.pad(batch.logits_indices, (0, ds)),
    )


def repad_rows(inputs: SamplingInputs, s: int) -> SamplingInputs:
    """Sampling inputs padded to s rows by repeating the last row (padding rows' outputs are
    never read; repeating keeps every value valid)."""
    ds = s - inputs.num_rows
    if ds == 0:
        return inputs
    pad = lambda a: None if a is None else np.pad(a, ((0, ds),) + ((0, 0),) * (a.ndim - 1), mode="edge")  # noqa: E731
    return SamplingInputs(**{f.name: pad(getattr(inputs, f.name)) for f in dataclasses.fields(inputs)})


class PipelineRunner(ModelRunner):
    """See the module docstring. `model.params` may be host numpy (they are placed per stage)."""

    def __init__(self, model, resolved, mesh, plan):  # noqa: D107 - not ModelRunner's device layout
        self.model = model
        self.mesh, self.plan = mesh, plan
        self.config = tp_model_config(model.config, mesh.shape[TP_AXIS])
        self.resolved = resolved
        self.num_compilations = 0
        self.num_compile_cache_hits = 0
        self.compile_cache_dir = compile_cache.enable(resolved.engine.compile_cache_dir)
        self.step_variants_used: set[tuple[int, str, bool]] = set()
        self.gather_variants_used: set[tuple[int, int]] = set()  # none: no hidden-state capture here
        if resolved.engine.batch_invariant:  # a jit static: row-tiled matmuls and sampler reductions
            self.config = dataclasses.replace(self.config, batch_invariant=True)
        # "auto" stays on the reference here: the CPU kernel under pipeline parallelism (a nested
        # shard_map per runner) recompiled ticks that runners on the same mesh otherwise share;
        # attention_backend="cpu" asks for it explicitly.
        backend = "reference" if resolved.engine.attention_backend == "auto" else resolved.engine.attention_backend
        self._attention_fn = attention_impl(backend, resolved.engine.batch_invariant)
        self.attention_backend = attention_run(backend, resolved.engine.batch_invariant)
        self.matmul_backend = "xla"  # the CPU kernel's packed weights are for one device only
        if resolve_attention_backend(backend) in ("pallas", "cpu"):
            # A kernel is opaque to GSPMD: inside the tick (manual over "pp") it runs per device
            # over its own KV heads under a nested shard_map over "tp", as in tensor parallelism.
            from jaxllm.parallel.attention import shard_map_attention

            self._attention_fn = shard_map_attention(self._attention_fn, mesh, axis_names={TP_AXIS})
        self.params = pipeline.place_stage_params(model.params, model.config, mesh, plan)
        self._kv_sharding = pipeline.kv_sharding(mesh)
        self.kv_caches = self._allocate_kv_cache(self._kv_sharding)
        self.carry = self._zero_carry()
        self._neutral: dict = {}
        self._jitted = tick_function(mesh, plan.layers_per_stage)
        self.host_caches = None
        self.swap_buckets: tuple[int, ...] = ()
        self._empty_batches: dict[int, BatchInputs] = {}
        if resolved.num_cpu_blocks:
            self._init_swap(self._kv_sharding)

    def _allocate_kv_cache(self, sharding, num_blocks=None):
        """One (K, V) pair per local layer slot, each [num_blocks, block_size, P * nKV, D]
        (pipeline.kv_cache_shape; num_blocks: the device cache's, or the host pool's for a
        pinned_host sharding)."""
        cfg, res = self.config, self.resolved
        num_blocks = res.num_kv_blocks if num_blocks is None else num_blocks
        shape = pipeline.kv_cache_shape(self.plan.num_stages, num_blocks, res.engine.cache.block_size,
                                        cfg.num_kv_heads, cfg.head_dim)
        dtype = jnp.dtype(res.engine.dtype)
        if sharding.memory_kind == runner_mod.SWAP_MEMORY_KIND:
            # Not a jitted zeros (ModelRunner._allocate_kv_cache says why); per shard, so each
            # process builds only its own devices' part (multi-host).
            # A fresh buffer per shard: a donated pool may be updated in place.
            zeros = lambda idx: np.zeros(sharding.shard_shape(shape), dtype)  # noqa: E731
            return [tuple(jax.make_array_from_callback(shape, sharding, zeros) for _ in range(2))
                    for _ in range(self.plan.layers_per_stage)]
        zeros = jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)
        return [(zeros(), zeros()) for _ in range(self.plan.layers_per_stage)]

    def _zero_carry(self):
        shape = (self.plan.num_stages, max(self.resolved.token_buckets), self.config.hidden_size)
        return jax.jit(lambda: jnp.zeros(shape, jnp.dtype(self.resolved.engine.dtype)),
                       out_shardings=pipeline.carry_sharding(self.mesh))()

    def _empty_batch(self, t: int) -> BatchInputs:
        """An all-padding batch of bucket t (a bubble's stage input)."""
        if t not in self._empty_batches:
            self._empty_batches[t] = prepare_batch([], np.zeros((1, self.resolved.max_blocks_per_seq), np.int32),
                                                   None, self.resolved.engine.cache.block_size, (t,),
                                                   self.resolved.engine.scheduler.max_num_seqs)
        return self._empty_batches[t]

    def run_tick(self, window: list[StepInputs | None]) -> StepOutputs | None:
        """Run stage s on window[s] for every s; returns the outputs of window[-1] (numpy)."""
        return self.fetch_outputs(self.dispatch_tick(window))

    @staticmethod
    def fetch_outputs(outputs) -> StepOutputs | None:
        """A dispatched tick's outputs as numpy (waits for the tick); None stays None."""
        return None if outputs is None else jax.tree.map(np.asarray, outputs)

    def dispatch_tick(self, window: list[StepInputs | None]):
        """run_tick without waiting: the outputs of window[-1] as device arrays (None for a
        bubble), read later by fetch_outputs. Only input preparation runs on the host here; the
        tick itself runs asynchronously (jax dispatch)."""
        if len(window) != self.plan.num_stages:
            raise ValueError(f"a tick needs {self.plan.num_stages} stage inputs, got {len(window)}")
        real = [w for w in window if w is not None]
        if not real:
            return None
        t = max(w.batch.padded_num_tokens for w in real)
        s = self._empty_batch(t).padded_num_seqs
        batches = [repad_batch(w.batch if w is not None else self._empty_batch(t), t, s) for w in window]
        last = window[-1]
        # A bubble at the last stage samples nothing anyone reads: it borrows the sampler variant
        # of the batch nearest the end, so bubbles compile no executable of their own.
        variant = next(w for w in reversed(window) if w is not None)
        sampler, prompt_lp = variant.sampler, variant.prompt_logprobs
        if last is not None:
            sampling = repad_rows(last.sampling, s)
        else:
            sampling, _ = build_sampling_inputs([], s, vocab_size=self.config.vocab_size,
                                                history_width=self.resolved.max_model_len,
                                                force_general=sampler != GREEDY)
        targets = np.zeros(t, np.int32)
        if last is not None and prompt_lp:
            targets[: last.prompt_targets.shape[0]] = last.prompt_targets
        stacked = StageInputs(
            token_ids=np.stack([b.token_ids for b in batches]),
            positions=np.stack([b.positions for b in batches]),
            metadata=AttentionMetadata(
                slot_mapping=np.stack([b.slot_mapping for b in batches]),
                block_tables=np.stack([b.block_tables for b in batches]),
                kv_lens=np.stack([b.kv_lens for b in batches]),
                cu_q_lens=np.stack([b.cu_q_lens for b in batches]),
            ),
        )
        stage_sharding = pipeline.stage_sharding(self.mesh)
        stacked = jax.tree.map(
            lambda x: jax.make_array_from_callback(x.shape, stage_sharding, lambda idx: x[idx]), stacked)
        logits_indices, sampling, targets = to_global(self.mesh, (batches[-1].logits_indices, sampling, targets))
        compiles, hits = runner_mod._NUM_XLA_COMPILES[0], compile_cache.NUM_CACHE_HITS[0]
        try:
            out, self.kv_caches, self.carry = self._jitted(
                self.params, self.kv_caches, self.carry, stacked, logits_indices, self._fill_neutral(sampling),
                targets, config=self.config, plan=self.plan, attention_fn=self._attention_fn,
                sampler=sampler, prompt_logprobs=prompt_lp,
            )
        finally:
            runner_mod._NUM_STEP_COMPILES[0] += self._count_built(compiles, hits)
        self.step_variants_used.add((t, sampler, prompt_lp))
        return None if last is None else out

    def execute(self, step: StepInputs) -> StepOutputs:
        """One batch through all P stages (P ticks, nothing else in flight): the synchronous
        pipeline, used by warm-up and by callers of the ModelRunner contract."""
        num_stages = self.plan.num_stages
        out = None
        for k in range(num_stages):
            window = [None] * num_stages
            window[k] = step
            out = self.run_tick(window)
        return out

    def kv_cache_lost(self) -> bool:
        return super().kv_cache_lost() or self.carry.is_deleted()

    def reset_kv_cache(self) -> None:
        super().reset_kv_cache()  # the KV caches and the host pool
        self.carry = self._zero_carry()
