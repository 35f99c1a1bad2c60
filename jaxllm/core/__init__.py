"""Host-side engine core: KV-cache manager, scheduler, scheduling policies. Never imports jax."""

from jaxllm.core.kv_cache import BlockPool, BlockTable, ComputedBlocks, KVCacheManager
from jaxllm.core.policies import (
    POLICIES,
    FCFSPolicy,
    PriorityPolicy,
    SchedulingPolicy,
    SJFPolicy,
    StaticBatchPolicy,
    get_policy,
    register_policy,
)
from jaxllm.core.scheduler import ScheduledRequest, Scheduler, SchedulerOutput

__all__ = [
    "BlockPool",
    "BlockTable",
    "ComputedBlocks",
    "KVCacheManager",
    "POLICIES",
    "FCFSPolicy",
    "PriorityPolicy",
    "SchedulingPolicy",
    "SJFPolicy",
    "StaticBatchPolicy",
    "get_policy",
    "register_policy",
    "ScheduledRequest",
    "Scheduler",
    "SchedulerOutput",
]
