"""Host-side engine core: block manager, scheduler, scheduling policies. Never imports jax."""

from jaxllm.core.block_manager import BlockManager
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
    "BlockManager",
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
