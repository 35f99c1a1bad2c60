"""How much memory the engine's devices have when it starts: sizes the default KV cache
(CacheConfig.gpu_memory_utilization, config.kv_budget_from_memory)."""

from __future__ import annotations

from jaxllm.config import DeviceMemory


def host_memory() -> DeviceMemory | None:
    """The host's RAM from /proc/meminfo (None where there is none, e.g. not Linux)."""
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f if ":" in line}
        return DeviceMemory("host", info["MemTotal"], info["MemTotal"] - info["MemAvailable"])
    except (OSError, KeyError, ValueError, IndexError):
        return None


def device_memory(devices) -> DeviceMemory | None:
    """The tightest device's memory: an accelerator's allocator limit and bytes in use, or the
    host's RAM for backends that report no memory stats (CPU)."""
    tightest = None
    for d in devices:
        try:
            stats = d.memory_stats()
        except Exception:  # noqa: BLE001 - a backend without the API reports nothing
            stats = None
        if not stats or "bytes_limit" not in stats:
            return host_memory()
        m = DeviceMemory("accelerator", int(stats["bytes_limit"]), int(stats.get("bytes_in_use", 0)))
        if tightest is None or m.total_bytes - m.in_use_bytes < tightest.total_bytes - tightest.in_use_bytes:
            tightest = m
    return tightest
