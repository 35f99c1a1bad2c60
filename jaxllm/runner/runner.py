"""ModelRunner: the device side of the engine.

It owns the parameters, the paged KV cache and the jitted step (forward + sampling). It is the
only place that moves data to the device. The KV cache is donated to the step, so XLA updates it
in place; the runner keeps the returned buffers for the next step.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.attention.metadata import AttentionMetadata
from jaxllm.config import ResolvedEngineConfig
from jaxllm.models import llama
from jaxllm.models.model_config import ModelConfig
from jaxllm.runner.batch import BatchInputs
from jaxllm import sampling


def attention_impl(backend: str):
    """The ragged paged attention function of a backend (same signature for all)."""
    if backend == "reference":
        from jaxllm.attention.reference import ragged_paged_attention
    elif backend == "pallas":
        from jaxllm.attention.pallas import ragged_paged_attention
    else:
        raise ValueError(f"attention_backend must be 'reference' or 'pallas', got {backend!r}")
    return ragged_paged_attention


def make_paged_attention(config: ModelConfig, metadata: AttentionMetadata, attention_fn):
    """Build the per-layer attention callable the model forward expects."""
    from jaxllm.attention.reference import write_kv

    sm_scale = config.head_dim**-0.5

    def attention(layer_idx, q, k, v, kv_cache_layer):
        k_cache, v_cache = write_kv(kv_cache_layer[0], kv_cache_layer[1], k, v, metadata.slot_mapping)
        out = attention_fn(
            q,
            k_cache,
            v_cache,
            metadata.kv_lens,
            metadata.block_tables,
            metadata.cu_q_lens,
            sm_scale=sm_scale,
            sliding_window=config.layer_sliding_windows[layer_idx],
        )
        return out, (k_cache, v_cache)

    return attention


def paged_step(params, kv_caches, token_ids, positions, metadata, logits_indices, sampling_inputs,
               prompt_targets, *, config: ModelConfig, attention_fn, flags, prompt_logprobs_k: int):
    """One engine step as a pure function: forward the ragged batch, sample a token per row.

    Args:
      token_ids, positions: [T] int32.
      metadata: AttentionMetadata for S rows.
      logits_indices: [S] int32, the token whose logits each row samples from.
      prompt_targets: [T] int32, the next prompt token after each token (for prompt_logprobs).
      prompt_logprobs_k: static; 0 skips prompt logprobs, else the top-k width.
    Returns:
      ({"token_ids", "logprobs", "top_logprobs", "top_token_ids": [S, ...] arrays, and with
        prompt_logprobs_k > 0 "prompt_logprobs" [T], "prompt_top_logprobs", "prompt_top_token_ids"
        [T, k]}, updated kv_caches).
    """
    attention = make_paged_attention(config, metadata, attention_fn)
    hidden, kv_caches = llama.forward(params, config, token_ids, positions, kv_caches, attention)
    logits = llama.compute_logits(params, config, hidden[logits_indices])
    sampled = sampling.sample(logits, sampling_inputs, flags)
    out = {f.name: getattr(sampled, f.name) for f in dataclasses.fields(sampled)}
    if prompt_logprobs_k:
        # Logits of every token, only in steps where some request asked for prompt logprobs.
        all_logits = llama.compute_logits(params, config, hidden)
        lp, top, ids = sampling.token_logprobs(all_logits, prompt_targets, prompt_logprobs_k)
        out.update(prompt_logprobs=lp, prompt_top_logprobs=top, prompt_top_token_ids=ids)
    return out, kv_caches


# Compiled steps are shared by every runner in the process: an ablation that builds one LLM per
# policy or cache size on the same model compiles each bucket once, not once per LLM. Keyed by the
# jit's sharding arguments (None for a single device); the static arguments (model config,
# attention function, sampling flags) key the jit's own cache.
_STEP_FUNCTIONS: dict = {}
_NUM_TRACES = [0]  # traces of any shared step function == compilations


def _traced_paged_step(params, kv_caches, token_ids, positions, metadata, logits_indices,
                       sampling_inputs, prompt_targets, config, attention_fn, flags, prompt_logprobs_k):
    # Runs only while tracing, so it counts compilations, not calls.
    _NUM_TRACES[0] += 1
    return paged_step(
        params, kv_caches, token_ids, positions, metadata, logits_indices, sampling_inputs,
        prompt_targets, config=config, attention_fn=attention_fn, flags=flags,
        prompt_logprobs_k=prompt_logprobs_k,
    )


def _step_function(jit_kwargs_key, jit_kwargs: dict):
    fn = _STEP_FUNCTIONS.get(jit_kwargs_key)
    if fn is None:
        fn = _STEP_FUNCTIONS[jit_kwargs_key] = jax.jit(
            _traced_paged_step,
            static_argnames=("config", "attention_fn", "flags", "prompt_logprobs_k"),
            donate_argnames=("kv_caches",),
            **jit_kwargs,
        )
    return fn


class ModelRunner:
    """Holds device state and runs jitted steps; counts the compilations its steps caused."""

    def __init__(self, model, resolved: ResolvedEngineConfig, mesh=None):
        self.model = model
        self.config: ModelConfig = model.config
        self.resolved = resolved
        self.num_compilations = 0
        self._attention_fn = attention_impl(resolved.engine.attention_backend)
        self.params = model.params
        self.mesh = mesh
        jit_kwargs, jit_key, kv_sharding = {}, None, None
        if mesh is not None:
            # Tensor parallelism (jaxllm/parallel): params and KV cache sharded over the "tp" axis,
            # inputs and sampler outputs replicated; XLA inserts the collectives.
            from jaxllm.parallel import runtime

            self.config, self.params = runtime.shard(model, mesh)
            self._attention_fn = runtime.wrap_attention(
                self._attention_fn, resolved.engine.attention_backend, mesh
            )
            kv_sharding = runtime.kv_cache_sharding(mesh)
            jit_kwargs = runtime.jit_shardings(mesh, self.config.num_layers)
            jit_key = (mesh, self.config.num_layers)
        self.kv_caches = self._allocate_kv_cache(kv_sharding)
        self._jitted = _step_function(jit_key, jit_kwargs)

    def _allocate_kv_cache(self, sharding):
        """Zeroed K and V caches per layer, each [num_blocks, block_size, nKV, D]; `sharding`
        (None: default device) puts each device's shard straight onto it."""
        cfg, res = self.config, self.resolved
        shape = (res.num_kv_blocks, res.engine.cache.block_size, cfg.num_kv_heads, cfg.head_dim)
        dtype = jnp.dtype(res.engine.dtype)
        # Built once (not per layer: a new lambda is a new jit cache entry, i.e. a compile each).
        zeros = jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)
        # One array per layer and per K/V: slicing a stacked [layers, ...] cache makes XLA on
        # CPU copy the slice every step.
        caches = [(zeros(), zeros()) for _ in range(cfg.num_layers)]
        return caches

    def execute(self, batch: BatchInputs, sampling_arrays: dict, flags, prompt_targets=None,
                prompt_logprobs_k: int = 0) -> dict[str, np.ndarray]:
        """Run one step; returns the step's outputs (see paged_step) as numpy arrays.

        prompt_targets: [T] int32 or None (zeros); prompt_logprobs_k: a logprobs bucket, 0 = off.
        """
        if prompt_targets is None:
            prompt_targets = np.zeros_like(batch.token_ids)
        metadata = AttentionMetadata(
            slot_mapping=batch.slot_mapping,
            block_tables=batch.block_tables,
            kv_lens=batch.kv_lens,
            cu_q_lens=batch.cu_q_lens,
        )
        inputs = sampling.SamplingInputs(**sampling_arrays)
        args = (batch.token_ids, batch.positions, metadata, batch.logits_indices, inputs, prompt_targets)
        if self.mesh is not None:
            from jaxllm.parallel.runtime import to_global

            args = to_global(self.mesh, args)  # global replicated arrays (needed multi-host)
        traces = _NUM_TRACES[0]
        out, self.kv_caches = self._jitted(
            self.params, self.kv_caches, *args, config=self.config, attention_fn=self._attention_fn,
            flags=flags, prompt_logprobs_k=prompt_logprobs_k,
        )
        self.num_compilations += _NUM_TRACES[0] - traces
        return {name: np.asarray(value) for name, value in out.items()}
