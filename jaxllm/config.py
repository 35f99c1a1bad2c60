"""Engine configuration: frozen dataclasses, validated on construction.

Every field is documented where it is declared. Values that depend on the model (max_model_len's
default, the number of KV blocks from a memory budget) are resolved by `EngineConfig.resolve`,
so a resolved config fully describes an engine run and can be logged with an experiment.
"""

from __future__ import annotations

import dataclasses
import math

from jaxllm.models.model_config import ModelConfig

DTYPES = ("float32", "bfloat16")
# "auto": the CPU kernel (jaxllm/attention/cpu) on a CPU backend where it builds, else "reference".
ATTENTION_BACKENDS = ("auto", "reference", "pallas", "cpu")
# "auto": the CPU matmul kernel (jaxllm/models/packed.py) on one CPU device with f32 weights
# (not batch-invariant) where it builds, else "xla" (XLA's dots).
MATMUL_BACKENDS = ("auto", "xla", "cpu")
PREEMPTION_MODES = ("recompute", "swap")
# How a step is compiled (EngineConfig.compilation).
COMPILATION_MODES = ("fused", "layered")
GiB = 1 << 30
# JAX's persistent compilation cache (jaxllm/runner/compile_cache.py); expanded at engine start.
DEFAULT_COMPILE_CACHE_DIR = "~/.cache/jaxllm/jax_compile_cache"


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


@dataclasses.dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16  # tokens per KV block
    # At most one way to size the cache: a block count, or a byte budget for K and V of all layers
    # on each device (per device, as vLLM's budget: with tensor parallelism a device holds only
    # its KV heads). With neither, it is sized from free memory (gpu_memory_utilization below).
    num_kv_blocks: int | None = None
    kv_cache_memory_bytes: int | None = None
    # vLLM's name: the fraction of a device's memory the engine may fill (weights, activations and
    # KV cache). The KV cache gets that fraction of the device's memory minus what is in use when
    # the engine starts (the weights), less an activation reserve, but never more than
    # max_num_seqs full-length sequences need. On CPU the "device" is the host's RAM, shared with
    # everything else: the fraction applies to the memory available now (MemAvailable), and the
    # budget is capped at CPU_KV_CACHE_CAP_BYTES (vLLM's CPU backend sizes its cache by a fixed
    # VLLM_CPU_KVCACHE_SPACE for the same reason). Ignored when one of the two fields above is set.
    gpu_memory_utilization: float = 0.9
    # Automatic prefix caching (vLLM v1): full blocks are found again by their chained token hash,
    # so requests sharing a prompt prefix compute it once. Off: no block is ever shared.
    enable_prefix_caching: bool = True
    # Host (CPU) memory for swapped-out KV blocks, in GiB per device (vLLM's name and default).
    # Only allocated when preemption can swap (SchedulerConfig.preemption_mode="swap", or a
    # policy that chooses the mode per victim), and never more than max_num_seqs full-length
    # requests' blocks. 0: no host pool, every preemption recomputes.
    swap_space: float = 4

    def __post_init__(self):
        _require(
            isinstance(self.block_size, int) and self.block_size >= 1,
            f"block_size must be a positive int, got {self.block_size!r}",
        )
        _require(
            self.num_kv_blocks is None or self.kv_cache_memory_bytes is None,
            f"give num_kv_blocks ({self.num_kv_blocks}) or kv_cache_memory_bytes "
            f"({self.kv_cache_memory_bytes}), not both",
        )
        _require(
            self.num_kv_blocks is None or (isinstance(self.num_kv_blocks, int) and self.num_kv_blocks >= 2),
            f"num_kv_blocks must be an int >= 2 (block 0 is a reserved sink), got {self.num_kv_blocks!r}",
        )
        _require(
            isinstance(self.gpu_memory_utilization, (int, float)) and not isinstance(self.gpu_memory_utilization, bool)
            and 0 < self.gpu_memory_utilization <= 1,
            f"gpu_memory_utilization must be a fraction in (0, 1], got {self.gpu_memory_utilization!r}",
        )
        _require(
            self.kv_cache_memory_bytes is None or self.kv_cache_memory_bytes > 0,
            f"kv_cache_memory_bytes must be > 0, got {self.kv_cache_memory_bytes!r}",
        )
        _require(
            isinstance(self.enable_prefix_caching, bool),
            f"enable_prefix_caching must be a bool, got {self.enable_prefix_caching!r}",
        )
        _require(
            isinstance(self.swap_space, (int, float)) and not isinstance(self.swap_space, bool)
            and math.isfinite(self.swap_space) and self.swap_space >= 0,
            f"swap_space must be a number of GiB >= 0, got {self.swap_space!r}",
        )


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64  # requests in one step at most
    max_num_batched_tokens: int = 512  # tokens (prefill chunks + decodes) in one step at most
    max_model_len: int | None = None  # prompt + output tokens per request; default: the model's
    scheduling_policy: object = "fcfs"  # a policy name or a jaxllm.core.policies.SchedulingPolicy
    # Split long prompts over steps. Off, a prompt runs whole in one step, which needs
    # max_num_batched_tokens >= max_model_len (checked by the scheduler).
    enable_chunked_prefill: bool = True
    # What a preempted request's KV blocks become (vLLM's name): "recompute" drops them and the
    # request computes its tokens again; "swap" copies them to the host pool (CacheConfig.swap_space)
    # and back on resume, falling back to recompute when the pool is full. A policy may choose
    # per victim (SchedulingPolicy.preemption_mode).
    preemption_mode: str = "recompute"

    def __post_init__(self):
        _require(
            isinstance(self.max_num_seqs, int) and self.max_num_seqs >= 1,
            f"max_num_seqs must be a positive int, got {self.max_num_seqs!r}",
        )
        _require(
            isinstance(self.max_num_batched_tokens, int) and self.max_num_batched_tokens >= 1,
            f"max_num_batched_tokens must be a positive int, got {self.max_num_batched_tokens!r}",
        )
        _require(
            self.max_model_len is None or (isinstance(self.max_model_len, int) and self.max_model_len >= 1),
            f"max_model_len must be a positive int, got {self.max_model_len!r}",
        )
        _require(
            self.preemption_mode in PREEMPTION_MODES,
            f"preemption_mode must be one of {PREEMPTION_MODES}, got {self.preemption_mode!r}",
        )


@dataclasses.dataclass(frozen=True)
class ParallelConfig:
    tensor_parallel_size: int = 1
    # Pipeline parallelism (jaxllm/parallel/pipeline.py): the layers split into this many
    # contiguous stages on a ("pp", "tp") mesh of P x T devices.
    pipeline_parallel_size: int = 1
    # Layers per stage, e.g. (3, 5) (vLLM's VLLM_PP_LAYER_PARTITION); None: an even split
    # (jaxllm/parallel/partition.py). Checked against the model before anything is loaded.
    pipeline_layer_partition: tuple[int, ...] | None = None
    # Host/device overlap (jaxllm/pipeline_step.py): dispatch tick t before reading tick t-1's
    # tokens, so the host's scheduling and batch preparation run while the devices compute. The
    # batch whose tokens are unread stays in flight one tick longer (one more batch in flight).
    pipeline_overlap_host: bool = False

    def __post_init__(self):
        _require(
            isinstance(self.tensor_parallel_size, int) and self.tensor_parallel_size >= 1,
            f"tensor_parallel_size must be a positive int, got {self.tensor_parallel_size!r}",
        )
        _require(
            isinstance(self.pipeline_parallel_size, int) and not isinstance(self.pipeline_parallel_size, bool)
            and self.pipeline_parallel_size >= 1,
            f"pipeline_parallel_size must be a positive int, got {self.pipeline_parallel_size!r}",
        )
        if self.pipeline_layer_partition is not None:
            part = self.pipeline_layer_partition
            _require(
                isinstance(part, (tuple, list)) and len(part) == self.pipeline_parallel_size
                and all(isinstance(c, int) and not isinstance(c, bool) and c >= 1 for c in part),
                f"pipeline_layer_partition={part!r} must be {self.pipeline_parallel_size} positive ints "
                f"(one per stage, pipeline_parallel_size={self.pipeline_parallel_size})",
            )
            object.__setattr__(self, "pipeline_layer_partition", tuple(part))
        _require(
            isinstance(self.pipeline_overlap_host, bool)
            and (not self.pipeline_overlap_host or self.pipeline_parallel_size > 1),
            f"pipeline_overlap_host={self.pipeline_overlap_host!r} must be a bool, True only with "
            f"pipeline_parallel_size > 1 (got {self.pipeline_parallel_size})",
        )


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    model: str  # a local HF directory, a .gguf file, or an alias such as "smollm2-135m-instruct"
    dtype: str = "float32"
    seed: int = 0  # seeds requests whose SamplingParams.seed is None
    attention_backend: str = "auto"
    # Who multiplies the decoder layers' projections: "xla" (XLA's dots), "cpu" (a C++ kernel
    # over weights packed at start-up, jaxllm/models/packed.py; one device, f32, not
    # batch-invariant), "auto" (the kernel where "cpu" is allowed and builds on a CPU backend).
    matmul_backend: str = "auto"
    cache: CacheConfig = CacheConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    parallel: ParallelConfig = ParallelConfig()
    # Token-count buckets a step is padded to; None derives powers of two up to
    # max_num_batched_tokens. Each bucket compiles once.
    token_buckets: tuple[int, ...] | None = None
    skip_tokenizer_init: bool = False
    # Directory of JAX's persistent compilation cache: a later process with the same model and
    # settings loads its compiled steps instead of compiling them. None: jaxllm does not enable it.
    # Process-wide: the first engine of a process that enables it picks the directory.
    compile_cache_dir: str | None = DEFAULT_COMPILE_CACHE_DIR
    # A request's logits bitwise identical alone or in any batch, in one chunk or several, after a
    # preemption, from the prefix cache: every matmul over fixed row tiles and the attention of
    # jaxllm/attention/invariant.py, or with attention_backend="pallas" the kernels' aligned query
    # tiles (a jit static; costs speed, see the README). Verified on one device (the Pallas
    # kernels in interpret mode on CPU), with tensor_parallel_size=2 and with
    # pipeline_parallel_size=2 (x tensor_parallel_size=2), reference attention.
    batch_invariant: bool = False
    # How a step is compiled. "fused": one XLA program per token bucket and step variant, every
    # decoder layer unrolled in it (each bucket compiles all layers). "layered": an embedding
    # program, one decoder-layer program per distinct layer signature (Llama: 1; Gemma 3:
    # sliding and global) dispatched once per layer with that layer's params and donated KV
    # cache, and a final-norm + LM head + sampling program (jaxllm/runner/runner.py). Layered
    # compiles a bucket several times faster; its steady-state step costs about the same on
    # CPU (measured in experiments/startup_time.py). Not with pipeline parallelism, whose tick
    # is fused. None (default): "layered", or "fused" under pipeline parallelism.
    compilation: str | None = None
    # vLLM's async scheduling: the host schedules and prepares step N+1 while the device runs
    # step N; a row whose input is step N's sampled token takes it on the device
    # (jaxllm/async_scheduling.py). Tokens are those of synchronous steps. Steps whose next
    # schedule needs the host to know the tokens run synchronously (logprobs, penalties, stop
    # strings, n > 1, instruments, a cache short enough to preempt, swaps); batch_invariant
    # engines always do. Needs tensor_parallel_size = pipeline_parallel_size = 1.
    async_scheduling: bool = False

    def __post_init__(self):
        _require(self.dtype in DTYPES, f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.compilation is None:
            object.__setattr__(self, "compilation", "layered" if self.parallel.pipeline_parallel_size == 1 else "fused")
        _require(self.compilation in COMPILATION_MODES,
                 f"compilation must be one of {COMPILATION_MODES}, got {self.compilation!r}")
        # The pipeline runs its stages' layers inside one jitted tick (jaxllm/parallel/pipeline_tick.py).
        _require(self.compilation == "fused" or self.parallel.pipeline_parallel_size == 1,
                 f"compilation={self.compilation!r} needs pipeline_parallel_size=1 (pipeline parallelism "
                 f"compiles its own fused tick), got {self.parallel.pipeline_parallel_size}; use compilation='fused'")
        _require(isinstance(self.batch_invariant, bool), f"batch_invariant must be a bool, got {self.batch_invariant!r}")
        _require(isinstance(self.async_scheduling, bool), f"async_scheduling must be a bool, got {self.async_scheduling!r}")
        _require(not self.async_scheduling or (self.parallel.pipeline_parallel_size == 1
                                               and self.parallel.tensor_parallel_size == 1),
                 "async_scheduling needs pipeline_parallel_size=1 and tensor_parallel_size=1 (pipeline "
                 "parallelism overlaps with pipeline_overlap_host)")
        # batch_invariant holds with both attention backends (attention/invariant.py, the Pallas
        # kernels' aligned tiles), under tensor parallelism (every collective but the embedding's
        # sits inside a row-tiled loop, on fixed [ROW_TILE, ...] tiles, and the embedding's
        # all-reduce adds zeros to one device's rows: exact) and under pipeline parallelism (a
        # stage's layers are the same row-tiled functions; ppermute and the last stage's psum of
        # zeros are exact).
        _require(
            self.attention_backend in ATTENTION_BACKENDS,
            f"attention_backend must be one of {ATTENTION_BACKENDS}, got {self.attention_backend!r}",
        )
        _require(self.matmul_backend in MATMUL_BACKENDS,
                 f"matmul_backend must be one of {MATMUL_BACKENDS}, got {self.matmul_backend!r}")
        _require(self.matmul_backend != "cpu" or (
            self.dtype == "float32" and not self.batch_invariant and self.parallel.pipeline_parallel_size == 1
            and self.parallel.tensor_parallel_size == 1),
            f"matmul_backend='cpu' needs dtype='float32', batch_invariant=False and one device "
            f"(tensor_parallel_size = pipeline_parallel_size = 1); got dtype={self.dtype!r}, "
            f"batch_invariant={self.batch_invariant}, tensor_parallel_size={self.parallel.tensor_parallel_size}, "
            f"pipeline_parallel_size={self.parallel.pipeline_parallel_size}")
        _require(
            self.compile_cache_dir is None or (isinstance(self.compile_cache_dir, str) and self.compile_cache_dir),
            f"compile_cache_dir must be a directory path or None, got {self.compile_cache_dir!r}",
        )
        if self.token_buckets is not None:
            _require(
                len(self.token_buckets) > 0 and all(isinstance(b, int) and b > 0 for b in self.token_buckets),
                f"token_buckets must be positive ints, got {self.token_buckets!r}",
            )

    @property
    def overlaps_steps(self) -> bool:
        """Whether the engine schedules a step while the previous one runs (async scheduling;
        batch-invariant engines run every step synchronously)."""
        return self.async_scheduling and not self.batch_invariant

    def resolve(self, model_config: ModelConfig, memory: "DeviceMemory | None" = None) -> "ResolvedEngineConfig":
        """Fill in the model-dependent defaults and check them against the model.

        memory: the device's memory when the engine starts (runner.device_memory), which sizes a
        cache given neither num_kv_blocks nor kv_cache_memory_bytes; None (no device known, e.g.
        host-only tests): max_num_seqs full-length sequences, capped at CPU_KV_CACHE_CAP_BYTES."""
        sched = self.scheduler
        max_model_len = sched.max_model_len or model_config.max_position_embeddings
        _require(
            max_model_len <= model_config.max_position_embeddings,
            f"max_model_len={max_model_len} exceeds the model's max_position_embeddings="
            f"{model_config.max_position_embeddings}",
        )
        block_size = self.cache.block_size
        max_blocks_per_seq = math.ceil(max_model_len / block_size)
        # KV heads on one device: sharded over tp, or one (replicated) head when tp > num_kv_heads.
        kv_heads_per_device = max(1, model_config.num_kv_heads // self.parallel.tensor_parallel_size)
        bytes_per_block = (
            2 * self._layers_per_device(model_config) * block_size * kv_heads_per_device
            * model_config.head_dim * (4 if self.dtype == "float32" else 2)
        )
        if self.cache.num_kv_blocks is not None:
            num_blocks = self.cache.num_kv_blocks
            kv_sizing = "num_kv_blocks"
        elif self.cache.kv_cache_memory_bytes is not None:
            num_blocks = self.cache.kv_cache_memory_bytes // bytes_per_block
            kv_sizing = f"kv_cache_memory_bytes={self.cache.kv_cache_memory_bytes}"
            _require(
                num_blocks >= 2,
                f"kv_cache_memory_bytes={self.cache.kv_cache_memory_bytes} holds {num_blocks} blocks of "
                f"{bytes_per_block} bytes; at least 2 are needed",
            )
        else:
            # One block beyond what max_num_seqs full-length sequences could use: block 0 is the sink.
            wanted = sched.max_num_seqs * max_blocks_per_seq + 1
            budget = kv_budget_from_memory(memory, self.cache.gpu_memory_utilization)
            num_blocks = max(2, min(wanted, budget // bytes_per_block))
            kv_sizing = (f"{num_blocks} blocks: min(max_num_seqs={sched.max_num_seqs} full-length sequences, "
                         f"{budget / GiB:.2f} GiB from "
                         f"{memory.describe(self.cache.gpu_memory_utilization) if memory else 'no memory info'})")
        num_cpu_blocks = 0
        if self.may_swap():
            # Block 0 of the host pool is a scratch block (copy padding), like the device's sink.
            # More blocks than max_num_seqs full-length requests hold would only serve swapped
            # requests beyond the seats; past that, preemption recomputes.
            cap = sched.max_num_seqs * max_blocks_per_seq + 1
            num_cpu_blocks = min(int(self.cache.swap_space * GiB) // bytes_per_block, cap)
            num_cpu_blocks = num_cpu_blocks if num_cpu_blocks >= 2 else 0
        token_buckets = self.token_buckets or _powers_of_two_up_to(sched.max_num_batched_tokens)
        _require(
            max(token_buckets) >= sched.max_num_batched_tokens,
            f"the largest token bucket {max(token_buckets)} is below max_num_batched_tokens="
            f"{sched.max_num_batched_tokens}",
        )
        return ResolvedEngineConfig(
            engine=self,
            max_model_len=max_model_len,
            num_kv_blocks=num_blocks,
            max_blocks_per_seq=max_blocks_per_seq,
            kv_cache_bytes=num_blocks * bytes_per_block,
            token_buckets=tuple(sorted(set(token_buckets))),
            num_cpu_blocks=num_cpu_blocks,
            bytes_per_block=bytes_per_block,
            kv_cache_sizing=kv_sizing,
        )

    def _layers_per_device(self, model_config: ModelConfig) -> int:
        """Layers whose KV cache one device holds: all of them, or a pipeline stage's slots."""
        if self.parallel.pipeline_parallel_size == 1:
            return model_config.num_layers
        from jaxllm.parallel.partition import StagePlan

        return StagePlan.build(model_config.num_layers, self.parallel.pipeline_parallel_size,
                               self.parallel.pipeline_layer_partition).layers_per_stage

    def may_swap(self) -> bool:
        """Whether any preemption can swap: the configured mode, or a policy choosing per victim."""
        from jaxllm.core.policies import policy_chooses_preemption_mode

        return (self.scheduler.preemption_mode == "swap"
                or policy_chooses_preemption_mode(self.scheduler.scheduling_policy))


@dataclasses.dataclass(frozen=True)
class ResolvedEngineConfig:
    engine: EngineConfig
    max_model_len: int
    num_kv_blocks: int  # including the reserved sink block 0
    max_blocks_per_seq: int
    kv_cache_bytes: int  # per device
    token_buckets: tuple[int, ...]
    num_cpu_blocks: int = 0  # host swap pool, including the scratch block 0; 0: no pool
    bytes_per_block: int = 0  # K and V of all layers, per device
    kv_cache_sizing: str = ""  # how num_kv_blocks was chosen (for logs and get_stats)


# On CPU the KV cache shares the host's RAM with everything: at most this much by default.
CPU_KV_CACHE_CAP_BYTES = 2 * GiB
# Kept free for activations and compiled programs when sizing from an accelerator's memory.
ACTIVATION_RESERVE_FRACTION = 0.05


@dataclasses.dataclass(frozen=True)
class DeviceMemory:
    """One device's memory when the engine starts (bytes). Accelerators report a limit and what
    is in use (the weights by then); the CPU backend reports nothing, so the host's is used."""

    kind: str  # "accelerator" or "host"
    total_bytes: int  # accelerator: the allocator's bytes_limit; host: MemTotal
    in_use_bytes: int  # accelerator: bytes_in_use; host: MemTotal - MemAvailable

    def describe(self, utilization: float) -> str:
        return (f"{self.kind} memory: {utilization:g} x {self.total_bytes / GiB:.1f} GiB, "
                f"{self.in_use_bytes / GiB:.1f} GiB in use")


def kv_budget_from_memory(memory: DeviceMemory | None, utilization: float) -> int:
    """KV cache bytes per device for CacheConfig.gpu_memory_utilization (see its comment)."""
    if memory is None:
        return CPU_KV_CACHE_CAP_BYTES
    if memory.kind == "host":
        available = memory.total_bytes - memory.in_use_bytes
        return max(0, min(int(utilization * available), CPU_KV_CACHE_CAP_BYTES))
    usable = utilization * memory.total_bytes - memory.in_use_bytes
    return max(0, int(usable - ACTIVATION_RESERVE_FRACTION * memory.total_bytes))


def _powers_of_two_up_to(n: int, smallest: int = 8) -> tuple[int, ...]:
    buckets, b = [], smallest
    while b < n:
        buckets.append(b)
        b *= 2
    buckets.append(n)
    return tuple(buckets)
