"""EngineConfig validation and resolution (host only, no model needed)."""

import pytest

from jaxllm.config import CacheConfig, EngineConfig, ParallelConfig, SchedulerConfig
from jaxllm.models.model_config import ModelConfig, RopeConfig


def model_config(num_kv_heads=4, max_pos=1000):
    return ModelConfig(
        architecture="LlamaForCausalLM", vocab_size=100, hidden_size=64, intermediate_size=128,
        num_layers=2, num_heads=8, num_kv_heads=num_kv_heads, head_dim=8, rms_norm_eps=1e-6,
        rope=RopeConfig(), max_position_embeddings=max_pos, tie_word_embeddings=False,
        attention_bias=False, qk_norm=False, layer_sliding_windows=(None, None),
    )


def test_blocks_from_memory_budget_per_device():
    # One block: 2 (K,V) * 2 layers * 16 tokens * 4 heads * 8 dims * 4 bytes = 8192 bytes.
    cfg = EngineConfig(model="m", cache=CacheConfig(kv_cache_memory_bytes=8192 * 10))
    res = cfg.resolve(model_config())
    assert res.num_kv_blocks == 10 and res.kv_cache_bytes == 81920
    # tp=2: a device holds 2 of the 4 KV heads, so the same budget buys twice the blocks.
    tp2 = EngineConfig(model="m", cache=CacheConfig(kv_cache_memory_bytes=8192 * 10),
                       parallel=ParallelConfig(tensor_parallel_size=2))
    assert tp2.resolve(model_config()).num_kv_blocks == 20
    # tp=8 > 4 KV heads: each device holds one (replicated) head.
    tp8 = EngineConfig(model="m", cache=CacheConfig(kv_cache_memory_bytes=8192 * 10),
                       parallel=ParallelConfig(tensor_parallel_size=8))
    assert tp8.resolve(model_config()).num_kv_blocks == 40


def test_defaults_resolve_from_the_model():
    res = EngineConfig(model="m", scheduler=SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=100)).resolve(
        model_config(max_pos=160)
    )
    assert res.max_model_len == 160 and res.max_blocks_per_seq == 10
    assert res.num_kv_blocks == 4 * 10 + 1  # every seat full length, plus sink block 0
    assert res.token_buckets == (8, 16, 32, 64, 100)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: CacheConfig(num_kv_blocks=10, kv_cache_memory_bytes=100), "not both"),
        (lambda: CacheConfig(block_size=0), "block_size must be a positive int, got 0"),
        (lambda: CacheConfig(num_kv_blocks=1), "num_kv_blocks must be an int >= 2"),
        (lambda: SchedulerConfig(max_num_seqs=0), "max_num_seqs must be a positive int, got 0"),
        (lambda: SchedulerConfig(max_num_batched_tokens=-3), "got -3"),
        (lambda: EngineConfig(model="m", dtype="float16"), "dtype must be one of"),
        (lambda: EngineConfig(model="m", attention_backend="triton"), "'triton'"),
        (lambda: ParallelConfig(tensor_parallel_size=0), "tensor_parallel_size"),
        (lambda: CacheConfig(swap_space=-1), "swap_space must be a number of GiB >= 0, got -1"),
        (lambda: CacheConfig(swap_space="4"), "got '4'"),
        (lambda: SchedulerConfig(preemption_mode="evict"), r"preemption_mode must be one of .*got 'evict'"),
    ],
)
def test_bad_values_are_named(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_resolve_rejects_what_the_model_cannot_do():
    with pytest.raises(ValueError, match="max_model_len=2000 exceeds the model's max_position_embeddings=1000"):
        EngineConfig(model="m", scheduler=SchedulerConfig(max_model_len=2000)).resolve(model_config())
    with pytest.raises(ValueError, match="holds 0 blocks"):
        EngineConfig(model="m", cache=CacheConfig(kv_cache_memory_bytes=100)).resolve(model_config())
    with pytest.raises(ValueError, match="largest token bucket 64 is below max_num_batched_tokens=512"):
        EngineConfig(model="m", token_buckets=(16, 64)).resolve(model_config())


def test_swap_pool_is_sized_from_swap_space_and_only_when_swap_can_happen():
    from jaxllm.core.policies import FCFSPolicy

    class Swapper(FCFSPolicy):
        def preemption_mode(self, victim):
            return "swap"

    # 8192-byte blocks (above); max_pos 160 -> 10 blocks per sequence.
    def resolve(mode="recompute", policy="fcfs", gib=4.0):
        sched = SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=100, preemption_mode=mode,
                                scheduling_policy=policy)
        return EngineConfig(model="m", scheduler=sched, cache=CacheConfig(swap_space=gib)).resolve(
            model_config(max_pos=160))

    assert resolve().num_cpu_blocks == 0  # recompute: no host pool is allocated
    assert resolve("swap", gib=8192 * 7 / (1 << 30)).num_cpu_blocks == 7  # scratch block included
    assert resolve("swap").num_cpu_blocks == 4 * 10 + 1  # 4 GiB capped at max_num_seqs full requests
    assert resolve("swap", gib=0).num_cpu_blocks == 0
    assert resolve(policy=Swapper()).num_cpu_blocks == 41  # the policy may swap: the pool exists


def test_kv_cache_sized_from_memory():
    """Neither blocks nor bytes given: the cache takes gpu_memory_utilization of free memory,
    never more than max_num_seqs full-length sequences (so tiny test models allocate little)."""
    from jaxllm.config import CPU_KV_CACHE_CAP_BYTES, GiB, DeviceMemory, kv_budget_from_memory

    block = 8192  # bytes per block of model_config() (see test_blocks_from_memory_budget_per_device)
    sched = SchedulerConfig(max_num_seqs=256, max_num_batched_tokens=100)
    cfg = EngineConfig(model="m", scheduler=sched, cache=CacheConfig(gpu_memory_utilization=0.5))
    # Accelerator: 0.5 x 10 MiB limit - 2 MiB in use (weights) - 5% reserve = 2.5 MiB = 320 blocks.
    acc = DeviceMemory("accelerator", 10 << 20, 2 << 20)
    res = cfg.resolve(model_config(), memory=acc)
    assert res.num_kv_blocks == int(0.5 * (10 << 20) - (2 << 20) - 0.05 * (10 << 20)) // block == 320
    assert "accelerator memory" in res.kv_cache_sizing
    # Host: half of what is available, capped; more seats than memory -> memory decides.
    assert kv_budget_from_memory(DeviceMemory("host", 20 * GiB, 4 * GiB), 0.5) == CPU_KV_CACHE_CAP_BYTES
    host = DeviceMemory("host", 3 << 20, 1 << 20)
    assert cfg.resolve(model_config(), memory=host).num_kv_blocks == (1 << 20) // block
    # Few seats: they decide, whatever the memory (every seat full length + the sink block).
    small = EngineConfig(model="m", scheduler=SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=100))
    assert small.resolve(model_config(max_pos=160), memory=acc).num_kv_blocks == 2 * 10 + 1
    with pytest.raises(ValueError, match="gpu_memory_utilization must be a fraction in \\(0, 1\\], got 1.5"):
        CacheConfig(gpu_memory_utilization=1.5)


def test_device_memory_on_this_backend():
    import jax

    from jaxllm.runner.memory import device_memory

    m = device_memory(jax.devices()[:1])
    assert m is not None and m.total_bytes > m.in_use_bytes >= 0
