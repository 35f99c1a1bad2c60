"""Step records pushed to observers: how experiments watch the engine without patching it.
Host only: never imports jax.

    peak = []
    llm.engine.add_step_observer(lambda s: peak.append(s.kv_blocks_used))
"""

from __future__ import annotations

import dataclasses
from typing import Callable


@dataclasses.dataclass(frozen=True)
class StepStats:
    """One engine step that ran a batch (a read-only snapshot taken after the step)."""

    step: int  # index of this step among the engine's steps that ran a batch
    time: float  # the engine clock (time.monotonic) at the end of the step
    num_scheduled_requests: int  # requests in the batch
    num_batched_tokens: int  # real (unpadded) tokens in the batch
    num_padded_tokens: int  # the token bucket the batch ran in (derived from the plan)
    num_running: int  # after the step
    num_waiting: int  # after the step
    num_preempted: int  # requests preempted while scheduling this step
    num_finished: int  # requests that finished in this step
    # KV blocks held while the step ran (after scheduling, before the requests that finished in
    # it freed theirs): the step's memory footprint.
    kv_blocks_used: int
    # The same, counting a block once per request holding it: what the requests would hold
    # without sharing. 1 - kv_blocks_used / kv_blocks_referenced is the PagedAttention paper's
    # memory saving from sharing (prefix cache, n > 1 samples, beams).
    kv_blocks_referenced: int


StepObserver = Callable[[StepStats], None]
