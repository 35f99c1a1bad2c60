"""ModelRunner: the device side of the engine.

It owns the parameters, the paged KV cache and the jitted step (forward + sampling). It is the
only place that moves data to the device. The KV cache is donated to the step, so XLA updates it
in place; the runner keeps the returned buffers for the next step.

Two ways to compile a step (EngineConfig.compilation): "fused", paged_step as one program per
token bucket and variant, every layer unrolled; "layered" (default), the same model functions
cut into an embedding program, one decoder-layer program per layer signature called once per
layer with that layer's KV cache donated, and a head + sampling program (see embed_step), so a
bucket compiles one layer, not all of them.

Swap preemption: a host pool of `num_cpu_blocks` blocks per layer (K and V, each
[num_cpu_blocks, block_size, nKV, D]) in JAX's `pinned_host` memory kind, and two jitted copies
over it: swap-out gathers device blocks into the (donated) host pool, swap-in gathers host blocks
into the (donated) device cache. A copy of n block pairs is padded to a power-of-two bucket with
(sink 0, scratch 0) pairs, and longer copies run in chunks of the largest bucket, so there are at
most 2 * len(swap_buckets) copy executables; warm-up compiles them all.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.attention.metadata import AttentionMetadata
from jaxllm.config import ResolvedEngineConfig
from jaxllm.models import layers, packed, registry
from jaxllm.models.model_config import ModelConfig
from jaxllm.runner import instruments
from jaxllm.runner.sampling_inputs import GENERAL, SamplingInputs
from jaxllm.runner.step_io import StepInputs, StepOutputs
from jaxllm import sampling
from jaxllm.runner import compile_cache
from jaxllm.runner.async_tokens import async_token_functions
from jaxllm.sampling_params import MAX_LOGPROBS


def resolve_attention_backend(backend: str) -> str:
    """"auto" -> "cpu" (the C++ per-token kernel, jaxllm/attention/cpu) on a CPU backend where it
    builds, else "reference"; any other name is returned as it is."""
    if backend != "auto":
        return backend
    if jax.default_backend() == "cpu":
        from jaxllm.attention import cpu

        if cpu.available():
            return "cpu"
    return "reference"


def resolve_matmul_backend(resolved: ResolvedEngineConfig, model_dtype: str, mesh=None) -> str:
    """EngineConfig.matmul_backend with "auto" resolved: "cpu" (the packed-weight kernel,
    jaxllm/models/packed.py) on one CPU device with f32 weights, not batch-invariant, where the
    kernel builds; else "xla". An explicit "cpu" that cannot run raises, saying why."""
    engine = resolved.engine
    backend = engine.matmul_backend
    if backend == "xla":
        return backend
    allowed = mesh is None and not engine.batch_invariant and model_dtype == "float32"
    on_cpu = jax.default_backend() == "cpu"
    if backend == "cpu":
        if not (allowed and on_cpu):
            raise ValueError(f"matmul_backend='cpu' needs the CPU backend (have {jax.default_backend()!r}), one "
                             f"device, f32 weights (have {model_dtype!r}) and batch_invariant=False")
        if not packed.available():
            raise ValueError(f"matmul_backend='cpu': {packed.unavailable_reason()}")
        return backend
    return "cpu" if allowed and on_cpu and packed.available() else "xla"


def attention_run(backend: str, batch_invariant: bool = False) -> str:
    """The attention a runner runs, by name ("auto" resolved; "batch_invariant" for the
    batch-invariant reference): what a step table was recorded with (jaxllm.sim.fit)."""
    backend = resolve_attention_backend(backend)
    return "batch_invariant" if batch_invariant and backend != "pallas" else backend


def attention_impl(backend: str, batch_invariant: bool = False):
    """The ragged paged attention function of a backend (same signature for all)."""
    backend = resolve_attention_backend(backend)
    if batch_invariant and backend == "pallas":
        from jaxllm.attention.pallas import batch_invariant_ragged_paged_attention as ragged_paged_attention
    elif batch_invariant:
        from jaxllm.attention.invariant import ragged_paged_attention
    elif backend == "reference":
        from jaxllm.attention.reference import ragged_paged_attention
    elif backend == "pallas":
        from jaxllm.attention.pallas import ragged_paged_attention
    elif backend == "cpu":
        from jaxllm.attention.cpu import ragged_paged_attention
    else:
        raise ValueError(f"attention_backend must be 'auto', 'reference', 'pallas' or 'cpu', got {backend!r}")
    return ragged_paged_attention


def make_paged_attention(config: ModelConfig, metadata: AttentionMetadata, attention_fn):
    """Build the per-layer attention callable the model forward expects."""
    from jaxllm.attention.reference import write_kv

    sm_scale = config.sm_scale

    def attention(layer_idx, q, k, v, kv_cache_layer):
        # The write stays outside per_layer: a LayerChoice's switch only reads the cache.
        k_cache, v_cache = write_kv(kv_cache_layer[0], kv_cache_layer[1], k, v, metadata.slot_mapping)
        out = layers.per_layer(
            layer_idx,
            lambda i, *a: attention_fn(*a, sm_scale=sm_scale, sliding_window=config.layer_sliding_windows[i],
                                       soft_cap=config.attn_logit_softcap),
            q, k_cache, v_cache, metadata.kv_lens, metadata.block_tables, metadata.cu_q_lens,
        )
        return out, (k_cache, v_cache)

    return attention


def paged_step(params, kv_caches, token_ids, positions, metadata, logits_indices, sampling_inputs,
               prompt_targets, residual_add=None, *, config: ModelConfig, attention_fn, sampler: str,
               prompt_logprobs: bool, instrumented: bool = False):
    """One engine step as a pure function: forward the ragged batch, sample a token per row.

    Args:
      token_ids, positions: [T] int32.
      metadata: AttentionMetadata for S rows.
      logits_indices: [S] int32, the token whose logits each row samples from.
      sampling_inputs: SamplingInputs with [S, ...] arrays (no None fields).
      prompt_targets: [T] int32, the next prompt token after each token (for prompt_logprobs).
      sampler: static, GREEDY or GENERAL (jaxllm/runner/sampling_inputs.py).
      prompt_logprobs: static; True computes every token's logits and the top-20 prompt logprobs.
      residual_add: [L, S, H] per-row interventions, only when instrumented (static): the step
        then also returns the residuals at every hidden-state index (runner/instruments.py).
    Returns:
      (StepOutputs of [S, ...] / [T, ...] arrays, updated kv_caches).
    """
    attention = make_paged_attention(config, metadata, attention_fn)
    hook, recorded = (instruments.residual_hook(residual_add, metadata.cu_q_lens, token_ids.shape[0])
                      if instrumented else (None, None))
    model = registry.get_model_module(config.architecture)  # at trace time: free in the compiled step
    hidden, kv_caches = model.forward(params, config, token_ids, positions, kv_caches, attention, hook)
    out = sample_outputs(params, config, hidden, logits_indices, sampling_inputs, prompt_targets,
                         sampler=sampler, prompt_logprobs=prompt_logprobs)
    if instrumented:
        out = dataclasses.replace(out, residuals=jnp.stack(recorded))
    return out, kv_caches


def sample_outputs(params, config: ModelConfig, hidden, logits_indices, sampling_inputs, prompt_targets, *,
                   sampler: str, prompt_logprobs: bool, rows=None) -> StepOutputs:
    """hidden [T, H] (after the final norm) -> StepOutputs: LM head on the rows' last tokens,
    sampling, and with `prompt_logprobs` every token's top-20 logprobs. `params` needs only
    "embed" / "lm_head" (the pipeline passes its last stage's table). rows: the sampled rows
    [S, H], normed apart by the caller (the layered head); hidden then serves prompt logprobs only."""
    # Batch-invariant mode: the sampler's row reductions over fixed row tiles too (layers.row_tiled).
    tile = layers.ROW_TILE if config.batch_invariant else None
    model = registry.get_model_module(config.architecture)
    logits = model.compute_logits(params, config, hidden[logits_indices] if rows is None else rows)
    sampled = layers.row_tiled(lambda lg, si: sampling.sample(lg, si, sampler), logits, sampling_inputs,
                               row_tile=tile)
    out = StepOutputs(sampled.token_ids, sampled.logprobs, sampled.top_logprobs, sampled.top_token_ids)
    if prompt_logprobs:
        # Logits of every token, only in steps where some request asked for prompt logprobs.
        all_logits = model.compute_logits(params, config, hidden)
        lp, top, ids = layers.row_tiled(lambda lg, tg: sampling.token_logprobs(lg, tg, MAX_LOGPROBS),
                                        all_logits, prompt_targets, row_tile=tile)
        out = dataclasses.replace(out, prompt_logprobs=lp, prompt_top_logprobs=top, prompt_top_token_ids=ids)
    return out


# The layered step (EngineConfig.compilation="layered"): the same model functions as paged_step,
# cut into three jitted programs so that a token bucket compiles one decoder layer per distinct
# layer signature instead of all of them unrolled:
#   x = embed_step(table, token_ids)                                   # [T, H]
#   for each layer i: x, kv[i] = layer_step(params_i, x, ..., kv[i])   # kv[i] donated
#   out = head_step(head_params, x, ...)                               # final norm, LM head, sampling
# JAX dispatches asynchronously, so the host only enqueues the L + 2 calls (~0.2 ms each on CPU).


def embed_step(table, token_ids, *, config: ModelConfig):
    """token_ids [T] int32 -> the residual stream [T, H] entering layer 0."""
    return registry.get_model_module(config.architecture).embed(table, config, token_ids)


def layer_step(lp, x, positions, kv_cache, metadata, residual_add, layer, *, config: ModelConfig,
               attention_fn, layer_idx: int, instrumented: bool):
    """One decoder layer of a layered step: x [T, H] -> (x [T, H], the layer's new (K, V)).

    layer_idx (static) is the first layer with this layer's signature (llama.layer_signature):
    it stands for every such layer, so they share this executable. When instrumented,
    residual_add [L, S, H] and layer (int32 scalar, the layer's real index, data) add the row's
    intervention to x at the layer's input, as paged_step's residual hook does (the caller
    records x before the call).
    """
    model = registry.get_model_module(config.architecture)
    if instrumented:
        row_add = jax.lax.dynamic_index_in_dim(residual_add, layer, keepdims=True)  # [1, S, H]
        hook, _ = instruments.residual_hook(row_add, metadata.cu_q_lens, x.shape[0])
        x = hook(0, x)
    attention = make_paged_attention(config, metadata, attention_fn)
    return model.decoder_layer(lp, config, x, positions, layer_idx, kv_cache, attention)


def select_rows(x, logits_indices, *, config: ModelConfig):
    """x [T, H] -> the S sampled rows [S, H]: a step without prompt logprobs or instruments
    reads nothing else, so its head program depends on S only and is shared by every token
    bucket with the same row count (S = min(T, max_num_seqs)). `config` is not read: it keys
    the program per model like the others, so a model's executables are its own to count."""
    return x[logits_indices]


def head_step(head_params, x, logits_indices, sampling_inputs, prompt_targets, recorded, *, config: ModelConfig,
              sampler: str, prompt_logprobs: bool, instrumented: bool):
    """The last layer's output x [T, H] -> StepOutputs (final norm, LM head, sampling). When
    instrumented, recorded is the L layer inputs [T, H] and the outputs carry the residuals
    [L + 1, T, H] (the final-norm output last), as paged_step's. Without prompt logprobs and
    instruments, x is select_rows' [S, H] and logits_indices is None (row i samples row i)."""
    model = registry.get_model_module(config.architecture)
    norm = lambda h: model.final_norm(head_params["final_norm"], config, h)  # noqa: E731
    # The sampled rows are normed as [S, H] in every variant, so a plain step and an instrumented
    # or prompt-logprobs one round a row's logits alike (a zero intervention changes no bit).
    rows = norm(x if logits_indices is None else x[logits_indices])
    hidden = norm(x) if (prompt_logprobs or instrumented) else None
    out = sample_outputs(head_params, config, hidden, None, sampling_inputs, prompt_targets,
                         sampler=sampler, prompt_logprobs=prompt_logprobs, rows=rows)
    if instrumented:
        out = dataclasses.replace(out, residuals=jnp.stack([*recorded, hidden]))
    return out


HEAD_PARAMS = ("embed", "lm_head", "final_norm")  # what head_step reads (the embedding when tied)

jax.tree_util.register_dataclass(
    StepOutputs, data_fields=[f.name for f in dataclasses.fields(StepOutputs)], meta_fields=[]
)

# Compiled steps are shared by every runner in the process: an ablation that builds one LLM per
# policy or cache size on the same model compiles each bucket once, not once per LLM. Keyed by the
# jit's sharding arguments (None for a single device); the static arguments (model config,
# attention function, sampler, prompt_logprobs, instrumented) key the jit's own cache. Sampling
# parameters, captures and interventions are data, so each token bucket has at most
# MAX_STEP_VARIANTS_PER_BUCKET executables, whatever the requests.
_STEP_FUNCTIONS: dict = {}

# Executables are counted from jax's own monitoring events, not from traces: jax can compile
# again without retracing (e.g. for new argument shardings), and each executable costs memory and
# hundreds of memory mappings, so the engine reports what was really built. An executable loaded
# from the persistent compilation cache counts as built; compile_cache.NUM_CACHE_HITS tells them
# apart from real XLA compilations.
_NUM_XLA_COMPILES = compile_cache.NUM_BACKEND_COMPILES  # every executable built in the process
_NUM_STEP_COMPILES = [0]  # those made while running an engine step == step executables
_XLA_COMPILE_SECONDS = compile_cache.BACKEND_COMPILE_SECONDS  # their total duration (step records keep compile time apart)


SWAP_MEMORY_KIND = "pinned_host"


def host_memory_available(devices) -> bool:
    """Whether every device can address a `pinned_host` memory (the swap pool's home)."""
    try:
        return all(any(m.kind == SWAP_MEMORY_KIND for m in d.addressable_memories()) for d in devices)
    except Exception:  # noqa: BLE001 - a backend without the memories API has no host memory kind
        return False


def swap_buckets(max_blocks_per_seq: int) -> tuple[int, ...]:
    """Block counts a copy is padded to: 1, 2, 4, ... up to the first power of two holding a
    whole request's blocks (larger copies run in chunks of the largest)."""
    buckets = [1]
    while buckets[-1] < max_blocks_per_seq:
        buckets.append(2 * buckets[-1])
    return tuple(buckets)


def swap_out_blocks(kv_caches, host_caches, device_ids, host_ids, *, host_sharding):
    """host_caches[l][i][host_ids[j]] = kv_caches[l][i][device_ids[j]] for every layer l, K/V i
    (every cache, the pipeline's per-slot ones included, has its blocks on axis 0).

    device_ids: [n] int32 on the device; host_ids: [n] int32 in host memory (a gather or scatter
    takes its indices from its operand's memory). Returns the new host caches.
    """
    return [
        tuple(h.at[host_ids].set(jax.device_put(c[device_ids], host_sharding)) for c, h in zip(layer, host_layer))
        for layer, host_layer in zip(kv_caches, host_caches)
    ]


def swap_in_blocks(kv_caches, host_caches, host_ids, device_ids, *, device_sharding):
    """kv_caches[l][i][device_ids[j]] = host_caches[l][i][host_ids[j]]; returns the new KV caches."""
    return [
        tuple(c.at[device_ids].set(jax.device_put(h[host_ids], device_sharding)) for c, h in zip(layer, host_layer))
        for layer, host_layer in zip(kv_caches, host_caches)
    ]


_SWAP_FUNCTIONS: dict = {}  # (direction, shardings, num_layers) -> jitted copy, shared by runners


def _swap_function(direction: str, device_sharding, host_sharding, num_layers: int):
    key = (direction, device_sharding, host_sharding, num_layers)
    fn = _SWAP_FUNCTIONS.get(key)
    if fn is None:
        if direction == "out":
            outs = [(host_sharding, host_sharding)] * num_layers
            fn = jax.jit(functools.partial(swap_out_blocks, host_sharding=host_sharding),
                         donate_argnums=1, out_shardings=outs)
        else:
            outs = [(device_sharding, device_sharding)] * num_layers
            fn = jax.jit(functools.partial(swap_in_blocks, device_sharding=device_sharding),
                         donate_argnums=0, out_shardings=outs)
        _SWAP_FUNCTIONS[key] = fn
    return fn


def _step_function(jit_kwargs_key, jit_kwargs: dict):
    fn = _STEP_FUNCTIONS.get(jit_kwargs_key)
    if fn is None:
        fn = _STEP_FUNCTIONS[jit_kwargs_key] = jax.jit(
            paged_step,
            static_argnames=("config", "attention_fn", "sampler", "prompt_logprobs", "instrumented"),
            donate_argnames=("kv_caches",),
            **jit_kwargs,
        )
    return fn


_LAYERED_FUNCTIONS: dict = {}  # (kind, sharding key, statics) -> jitted layered piece, shared by runners
_LAYERED_TARGETS = {"embed": (embed_step, ()), "layer": (layer_step, (3,)), "select": (select_rows, ()),
                    "head": (head_step, ())}  # fn, donated argnums


def _layered_function(kind: str, jit_key, out_shardings, **statics):
    """The jitted embed / layer / head program for these statics (bound with functools.partial,
    so a call hashes no config: the layer program is called L times a step)."""
    key = (kind, jit_key, tuple(sorted(statics.items())))
    fn = _LAYERED_FUNCTIONS.get(key)
    if fn is None:
        target, donate = _LAYERED_TARGETS[kind]
        kwargs = {} if out_shardings is None else {"out_shardings": out_shardings}
        fn = _LAYERED_FUNCTIONS[key] = jax.jit(functools.partial(target, **statics), donate_argnums=donate, **kwargs)
    return fn


class ModelRunner:
    """Holds device state and runs jitted steps; counts the compilations its steps caused."""

    def __init__(self, model, resolved: ResolvedEngineConfig, mesh=None):
        self.model = model
        self.config: ModelConfig = model.config
        self.resolved = resolved
        # Executables its steps and copies built (compiled, or loaded from the persistent cache),
        # and how many of those were persistent-cache hits.
        self.num_compilations = 0
        self.num_compile_cache_hits = 0
        self.compile_cache_dir = compile_cache.enable(resolved.engine.compile_cache_dir)
        # (token bucket, sampler, prompt_logprobs, instrumented) of every step run: the executables
        # it needs. Plus the hidden-state gathers, (token bucket, capture bucket) pairs.
        self.step_variants_used: set[tuple[int, str, bool, bool]] = set()
        self.gather_variants_used: set[tuple[int, int]] = set()
        self._attention_fn = attention_impl(resolved.engine.attention_backend, resolved.engine.batch_invariant)
        self.attention_backend = attention_run(resolved.engine.attention_backend, resolved.engine.batch_invariant)
        self.params = model.params
        self.mesh = mesh
        jit_kwargs, jit_key, kv_sharding = {}, None, None
        if mesh is not None:
            # Tensor parallelism (jaxllm/parallel): params and KV cache sharded over the "tp" axis,
            # inputs and sampler outputs replicated; XLA inserts the collectives.
            from jaxllm.parallel import runtime

            self.config, self.params = runtime.shard(model, mesh)
            self._attention_fn = runtime.wrap_attention(
                self._attention_fn, resolve_attention_backend(resolved.engine.attention_backend), mesh
            )
            kv_sharding = runtime.kv_cache_sharding(mesh)
            jit_kwargs = runtime.jit_shardings(mesh, self.config.num_layers)
            jit_key = (mesh, self.config.num_layers)
        self.matmul_backend = resolve_matmul_backend(resolved, model.dtype, mesh)
        if self.matmul_backend == "cpu":
            # The projections packed for the kernel replace the plain weights, in the model too
            # (Engine.model is this), so a loaded model's weights are held once.
            self.params = packed.pack_params(self.params)
            self.model = model = dataclasses.replace(model, params=self.params)
        if resolved.engine.batch_invariant:  # a jit static: its own executables
            self.config = dataclasses.replace(self.config, batch_invariant=True)
        self._kv_sharding = kv_sharding
        self.kv_caches = self._allocate_kv_cache(kv_sharding)
        self._neutral: dict = {}  # (shape, dtype) -> device array, see _fill_neutral
        self._jitted = _step_function(jit_key, jit_kwargs)
        self.compilation = resolved.engine.compilation
        self._jit_key = jit_key
        if self.compilation == "layered":
            self._init_layered()
        # Async scheduling: the last step's sampled tokens padded to [max_num_seqs] (device), which
        # the next step's take_index reads (runner/async_tokens.py); made by the first such step.
        self._previous_token_ids = None
        self.host_caches = None  # the swap pool, [(K, V)] per layer, when num_cpu_blocks > 0
        self.swap_buckets: tuple[int, ...] = ()
        if resolved.num_cpu_blocks:
            self._init_swap(kv_sharding)

    def _init_layered(self) -> None:
        """Layered step state: each layer's representative (the first layer with its signature),
        the head's params, and the out_shardings of the three programs under tensor parallelism
        (the residual stream replicated between layers, each layer's KV cache over KV heads)."""
        cfg = self.config
        model = registry.get_model_module(cfg.architecture)
        first: dict = {}
        self._layer_reps = tuple(first.setdefault(model.layer_signature(cfg, i), i) for i in range(cfg.num_layers))
        self._head_params = {k: self.params[k] for k in HEAD_PARAMS if k in self.params}
        self._layer_numbers = None  # int32 device scalars 0..L-1, made on the first instrumented step
        # Committed outputs even on one device: layer 0 would otherwise see an uncommitted x
        # (from the embedding) and layer 1 a committed one, and compile twice.
        if self.mesh is None:
            rep = kv = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        else:
            from jaxllm.parallel.rules import replicated

            rep, kv = replicated(self.mesh), self._kv_sharding
        self._layered_shardings = {"embed": rep, "layer": (rep, (kv, kv)), "select": rep,
                                   "head": None if self.mesh is None else rep}
        self._layered_fns: dict = {}

    def _layered(self, kind: str, **statics):
        """This runner's jitted layered piece (a per-runner dict in front of _layered_function)."""
        key = (kind, *sorted(statics.items()))
        fn = self._layered_fns.get(key)
        if fn is None:
            fn = self._layered_fns[key] = _layered_function(
                kind, self._jit_key, self._layered_shardings[kind], config=self.config, **statics)
        return fn

    def _run_layered(self, step: StepInputs, layers: tuple[int, ...] | None = None) -> StepOutputs:
        """One layered step (see embed_step): L + 2 asynchronous dispatches; the KV cache of
        layer i is donated to its call and replaced by the result as the chain goes.
        layers: run only these decoder layers (warm-up; not with instruments, whose head takes
        every layer's residual); None: all."""
        token_ids, positions, metadata, logits_indices, sampling_inputs, targets, residual_add = self.device_args(step)
        if self.mesh is None:
            # Moved once, not once per layer call (a numpy argument is copied at every call).
            positions, metadata, residual_add = jax.device_put((positions, metadata, residual_add))
        inst = step.instrumented
        if inst and self._layer_numbers is None:
            numbers = np.arange(self.config.num_layers, dtype=np.int32)
            if self.mesh is not None:
                from jaxllm.parallel.runtime import to_global

                self._layer_numbers = [to_global(self.mesh, n) for n in numbers]
            else:
                self._layer_numbers = list(jax.device_put(list(numbers)))
        x = self._layered("embed")(self.params["embed"], token_ids)
        recorded, caches = [], list(self.kv_caches)
        try:
            for i, lp in enumerate(self.params["layers"]):
                if layers is not None and i not in layers:
                    continue
                layer = self._layered("layer", attention_fn=self._attention_fn, layer_idx=self._layer_reps[i],
                                      instrumented=inst)
                if inst:
                    recorded.append(x)
                x, caches[i] = layer(lp, x, positions, caches[i], metadata, residual_add,
                                     self._layer_numbers[i] if inst else None)
        finally:
            self.kv_caches = caches  # donated entries replaced so far (kv_cache_lost sees the rest)
        if not (inst or step.prompt_logprobs):
            # Nothing of [T] shape left (the unread targets neither): the head is keyed by S.
            x, logits_indices, targets = self._layered("select")(x, logits_indices), None, None
        head = self._layered("head", sampler=step.sampler, prompt_logprobs=step.prompt_logprobs, instrumented=inst)
        return head(self._head_params, x, logits_indices, sampling_inputs, targets, recorded)

    def step_executables_per_bucket(self, step_variants, instrumented_variants=()) -> int:
        """How many step executables one token bucket needs for these (sampler, prompt_logprobs)
        variants (and instrumented ones), counting its own only: one each when fused; layered:
        the embedding, one decoder layer per distinct signature (and per instrumented flag in
        use), one head each, and the row selection when some variant has neither prompt
        logprobs nor instruments (its heads are then shared by buckets of the same row count,
        counted here for each bucket); with async scheduling two more."""
        # Async scheduling: the token resolution and the row padding (runner/async_tokens.py).
        extra = 2 if self.resolved.engine.overlaps_steps else 0
        if self.compilation == "fused":
            return len(step_variants) + len(instrumented_variants) + extra
        flags = bool(step_variants) + bool(instrumented_variants)
        select = any(not prompt_logprobs for _, prompt_logprobs in step_variants)
        return 1 + len(set(self._layer_reps)) * flags + select + len(step_variants) + len(instrumented_variants) + extra

    def _init_swap(self, kv_sharding) -> None:
        if kv_sharding is None:
            kv_sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
            index_sharding = kv_sharding
        else:
            index_sharding = jax.sharding.NamedSharding(kv_sharding.mesh, jax.sharding.PartitionSpec())
        self._device_sharding = kv_sharding.with_memory_kind("device")
        self._host_sharding = kv_sharding.with_memory_kind(SWAP_MEMORY_KIND)
        self._index_shardings = (index_sharding.with_memory_kind("device"),
                                 index_sharding.with_memory_kind(SWAP_MEMORY_KIND))
        self.swap_buckets = swap_buckets(self.resolved.max_blocks_per_seq)
        n = len(self.kv_caches)  # cache arrays: one (K, V) per layer, or per stage slot under PP
        self._swap_out = _swap_function("out", self._device_sharding, self._host_sharding, n)
        self._swap_in = _swap_function("in", self._device_sharding, self._host_sharding, n)
        self.host_caches = self._allocate_kv_cache(self._host_sharding, self.resolved.num_cpu_blocks)

    def _allocate_kv_cache(self, sharding, num_blocks: int | None = None):
        """Zeroed K and V caches per layer, each [num_blocks, block_size, nKV, D]; `sharding`
        (None: default device) puts each device's shard straight onto it."""
        cfg, res = self.config, self.resolved
        num_blocks = res.num_kv_blocks if num_blocks is None else num_blocks
        shape = (num_blocks, res.engine.cache.block_size, cfg.num_kv_heads, cfg.head_dim)
        dtype = jnp.dtype(res.engine.dtype)
        if sharding is not None and sharding.memory_kind == SWAP_MEMORY_KIND:
            # device_put, not a jitted zeros: jax 0.10 types a jit's pinned_host output as device
            # memory, and the copies then refuse to gather from it.
            return [tuple(jax.device_put(np.zeros(shape, dtype), sharding) for _ in range(2))
                    for _ in range(cfg.num_layers)]
        # Committed to the device even without a mesh: the swap-in copy returns committed
        # arrays, and the jitted step would compile again for a committed cache.
        sharding = sharding if sharding is not None else jax.sharding.SingleDeviceSharding(jax.devices()[0])
        # Built once (not per layer: a new lambda is a new jit cache entry, i.e. a compile each).
        zeros = jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)
        # One array per layer and per K/V: slicing a stacked [layers, ...] cache makes XLA on
        # CPU copy the slice every step.
        caches = [(zeros(), zeros()) for _ in range(cfg.num_layers)]
        return caches

    def execute(self, step: StepInputs) -> StepOutputs:
        """Run one step; returns its outputs as numpy arrays."""
        return self.fetch(self.dispatch(step))

    def dispatch(self, step: StepInputs) -> StepOutputs:
        """Enqueue one step without waiting for it; returns its outputs as device arrays (for
        `fetch`). The KV cache is the step's result already, so the next step can be dispatched
        behind it (async scheduling)."""
        return self._dispatch(step)

    @staticmethod
    def fetch(outputs: StepOutputs) -> StepOutputs:
        """Wait for a dispatched step; its outputs as numpy arrays."""
        return jax.tree.map(np.asarray, outputs)

    def warmup_step(self, step: StepInputs) -> None:
        """Build every executable `execute(step)` needs, as cheaply as possible; the outputs are
        garbage. Layered (without instruments): the embedding, one layer per distinct layer
        program (Llama: 1 of L) and the head, instead of all L layers: executing the whole stack
        for each of the 21 (bucket, variant) pairs was most of a warm-up whose executables came
        from the persistent cache. Otherwise (fused, pipeline, instruments): `execute(step)`."""
        if self.compilation == "layered" and not step.instrumented:
            self._execute(step, layers=tuple(sorted(set(self._layer_reps))))
        else:
            self.execute(step)

    def _execute(self, step: StepInputs, layers: tuple[int, ...] | None = None) -> StepOutputs:
        return self.fetch(self._dispatch(step, layers))

    def _dispatch(self, step: StepInputs, layers: tuple[int, ...] | None = None) -> StepOutputs:
        compiles, hits = _NUM_XLA_COMPILES[0], compile_cache.NUM_CACHE_HITS[0]
        try:
            if step.batch.take_index is not None:
                step = self._resolve_token_ids(step)
            if self.compilation == "layered":
                out = self._run_layered(step, layers)
            else:
                out, self.kv_caches = self._jitted(
                    self.params, self.kv_caches, *self.device_args(step), config=self.config,
                    attention_fn=self._attention_fn, sampler=step.sampler, prompt_logprobs=step.prompt_logprobs,
                    instrumented=step.instrumented,
                )
            if step.batch.take_index is not None:  # the next step may take from these
                self._previous_token_ids = self._async_fns[1](out.token_ids)
        finally:
            _NUM_STEP_COMPILES[0] += self._count_built(compiles, hits)
        self.step_variants_used.add(
            (step.batch.padded_num_tokens, step.sampler, step.prompt_logprobs, step.instrumented))
        if step.instrumented:
            out = dataclasses.replace(out, residuals=None, hidden_states=self._gather_hidden_states(step, out.residuals))
        return out

    def _resolve_token_ids(self, step: StepInputs) -> StepInputs:
        """The step with its token_ids on the device, the in-flight ones taken from the previous
        step's sampled tokens (batch.take_index; runner/async_tokens.py). Single device only
        (EngineConfig refuses async scheduling with a mesh)."""
        resolve, _ = self._async_fns
        previous = self._previous_token_ids
        if previous is None:  # nothing dispatched yet: every take_index is -1
            previous = self._neutral_array((self.resolved.engine.scheduler.max_num_seqs,), np.int32, 0)
        batch = step.batch
        token_ids = resolve(batch.token_ids, batch.take_index, previous)
        return dataclasses.replace(step, batch=dataclasses.replace(batch, token_ids=token_ids))

    @functools.cached_property
    def _async_fns(self):
        sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        return async_token_functions(sharding, self.resolved.engine.scheduler.max_num_seqs)

    def _gather_hidden_states(self, step: StepInputs, residuals):
        """[R, H] captured pairs (device), or None when the step captures nothing: only these
        rows of the [L + 1, T, H] residuals leave the device."""
        inst = step.instruments
        if not inst.num_captured:
            return None
        compiles, hits = _NUM_XLA_COMPILES[0], compile_cache.NUM_CACHE_HITS[0]
        try:
            index = (inst.capture_layers, inst.capture_tokens)
            if self.mesh is not None:
                from jaxllm.parallel.runtime import to_global

                index = to_global(self.mesh, index)
            gathered = instruments.gather_hidden_states(residuals, *index)
        finally:
            self._count_built(compiles, hits)
        self.gather_variants_used.add((step.batch.padded_num_tokens, len(inst.capture_layers)))
        return gathered

    def swap(self, blocks_to_swap_out, blocks_to_swap_in) -> None:
        """Copy (device, host) block pairs out, then (host, device) pairs in: swap-outs read
        blocks this step may reuse, swap-ins must land before the forward (scheduler docstring)."""
        if not (blocks_to_swap_out or blocks_to_swap_in):
            return
        if self.host_caches is None:
            raise RuntimeError("swap planned but this runner has no host pool (num_cpu_blocks=0)")
        compiles, hits = _NUM_XLA_COMPILES[0], compile_cache.NUM_CACHE_HITS[0]
        try:
            for dev, host in self._swap_chunks(blocks_to_swap_out, swap_in=False):
                self.host_caches = self._swap_out(self.kv_caches, self.host_caches, dev, host)
            for host, dev in self._swap_chunks(blocks_to_swap_in, swap_in=True):
                self.kv_caches = self._swap_in(self.kv_caches, self.host_caches, host, dev)
        finally:
            self._count_built(compiles, hits)

    def _count_built(self, compiles_before: int, hits_before: int) -> int:
        """Add the executables built since the counters read (compiles_before, hits_before)."""
        new = _NUM_XLA_COMPILES[0] - compiles_before
        self.num_compilations += new
        self.num_compile_cache_hits += compile_cache.NUM_CACHE_HITS[0] - hits_before
        return new

    def _swap_chunks(self, pairs, swap_in: bool):
        """Bucket-padded index arrays per chunk, each index in its operand's memory: the first
        of a pair is the source (device for swap-out, host for swap-in)."""
        largest = self.swap_buckets[-1]
        device_kind, host_kind = self._index_shardings
        first, second = (host_kind, device_kind) if swap_in else (device_kind, host_kind)
        for lo in range(0, len(pairs), largest):
            chunk = np.asarray(pairs[lo : lo + largest], np.int32).reshape(-1, 2)
            size = next(b for b in self.swap_buckets if b >= len(chunk))
            padded = np.zeros((size, 2), np.int32)  # (sink 0, scratch 0) pairs
            padded[: len(chunk)] = chunk
            yield jax.device_put(padded[:, 0], first), jax.device_put(padded[:, 1], second)

    def warmup_swap(self) -> None:
        """Compile both copies for every bucket (all-padding copies between sink and scratch)."""
        for size in self.swap_buckets:
            self.swap([(0, 0)] * size, [(0, 0)] * size)

    def device_args(self, step: StepInputs) -> tuple:
        """paged_step's arguments after (params, kv_caches), ready for the jitted step."""
        if step.prompt_logprobs and step.sampler != GENERAL:
            raise ValueError("a step with prompt logprobs must use the GENERAL sampler")
        batch = step.batch
        # Not zeros_like(token_ids): under async scheduling they are a device array still being
        # computed, and numpy would wait for it.
        targets = step.prompt_targets if step.prompt_logprobs else np.zeros(batch.padded_num_tokens, np.int32)
        metadata = AttentionMetadata(
            slot_mapping=batch.slot_mapping,
            block_tables=batch.block_tables,
            kv_lens=batch.kv_lens,
            cu_q_lens=batch.cu_q_lens,
        )
        args = (batch.token_ids, batch.positions, metadata, batch.logits_indices, step.sampling, targets)
        residual_add = None
        if step.instrumented:
            residual_add = step.instruments.residual_add
            if residual_add is None:  # no row intervenes: a cached device-resident zero array
                shape = (self.config.num_layers, batch.padded_num_seqs, self.config.hidden_size)
                residual_add = self._neutral_array(shape, np.float32, 0.0)
            elif self.mesh is not None:
                from jaxllm.parallel.runtime import to_global

                residual_add = to_global(self.mesh, residual_add)
        if self.mesh is not None:
            from jaxllm.parallel.runtime import to_global

            args = to_global(self.mesh, args)  # global replicated arrays (needed multi-host)
        return (*args[:4], self._fill_neutral(args[4]), args[5], residual_add)

    def _fill_neutral(self, inputs: SamplingInputs) -> SamplingInputs:
        """Replace the None wide arrays (no row uses them) by cached neutral device arrays, so a
        GENERAL step ships [S, H] history or an [S, V] mask only when some row needs them."""
        s = inputs.num_rows
        replace = {}
        if inputs.token_history is None:
            replace["token_history"] = self._neutral_array((s, self.resolved.max_model_len), np.int32, -1)
        if inputs.stop_token_mask is None:
            replace["stop_token_mask"] = self._neutral_array((s, self.config.vocab_size), np.bool_, False)
        return dataclasses.replace(inputs, **replace) if replace else inputs

    def _neutral_array(self, shape, dtype, value):
        key = (shape, np.dtype(dtype).name)
        array = self._neutral.get(key)
        if array is None:
            host = np.full(shape, value, dtype)
            if self.mesh is not None:
                from jaxllm.parallel.runtime import to_global

                array = to_global(self.mesh, host)
            else:
                array = jax.device_put(host)
            array = self._neutral[key] = array
        return array

    @property
    def compile_seconds(self) -> float:
        """Seconds spent in XLA compilation in this process so far (all compilations)."""
        return _XLA_COMPILE_SECONDS[0]

    @property
    def num_executables(self) -> int:
        """Step executables compiled in this process by every runner (whatever its model or
        cache shape; jit keeps them all): fused steps, or a layered step's embedding, layer and
        head programs (step_executables_per_bucket). Each holds memory and memory mappings,
        which is why their number must stay bounded."""
        return _NUM_STEP_COMPILES[0]

    def kv_cache_lost(self) -> bool:
        """True when a failed step or copy consumed the donated KV cache or host pool."""
        caches = self.kv_caches + (self.host_caches or [])
        return any(k.is_deleted() or v.is_deleted() for k, v in caches)

    def reset_kv_cache(self) -> None:
        """Allocate a fresh zeroed KV cache and host pool (after kv_cache_lost); every cached
        or swapped token is gone."""
        self.kv_caches = self._allocate_kv_cache(self._kv_sharding)
        if self.host_caches is not None:
            self.host_caches = self._allocate_kv_cache(self._host_sharding, self.resolved.num_cpu_blocks)
