"""Scheduling policies: who is admitted next, who may join, who is preempted. Host only.

The scheduler (`jaxllm.core.scheduler`) is the mechanism: it spends the token budget, allocates
blocks, and preempts when blocks run out. A `SchedulingPolicy` only makes three decisions:

  order_waiting(waiting, now) -> list[Request]   admission order of waiting (and preempted) requests
  can_admit(request, running) -> bool            may this request join the running batch now?
  choose_victim(running) -> Request              whom to preempt when KV blocks run out

plus two optional hooks: `begin_admission(running, now)`, called once per step just before
admission (with the requests that keep running this step), for policies that need per-step state;
and `preemption_mode(victim) -> "recompute" | "swap" | None`, asked for each victim `choose_victim`
returned: "swap" copies its KV blocks to the host pool and back on resume (keeping its computed
tokens), "recompute" drops them, None (the default) takes the engine's `preemption_mode`. A swap
that finds the host pool full recomputes instead (counted in `get_stats()["num_swap_fallbacks"]`).

Contract:
  * `order_waiting` returns a permutation of `waiting` (it may drop nothing). `waiting` arrives in
    queue order: preempted requests first (most recently preempted first), then by arrival.
  * `running` lists running requests in admission order (oldest first); in `can_admit` it also holds
    the requests admitted earlier in this same step.
  * `choose_victim` must return a member of `running`. The candidate list includes the request that
    is asking for blocks, so a policy may preempt the requester itself.
  * The scheduler stops admitting at the first request that does not fit the token budget, the
    seats or the free blocks (head-of-line, as vLLM), but merely skips a request the policy refuses
    in `can_admit`. So a policy's order is also its starvation guarantee.

Worked example: longest-waiting-first with aging on top of priorities. A request's effective
priority improves by one level for every `aging_s` seconds it has waited, so low-priority work
cannot starve; preemption still hits the worst base priority, newest first.

    from jaxllm.core.policies import SchedulingPolicy

    class AgingPriorityPolicy(SchedulingPolicy):
        name = "aging"

        def __init__(self, aging_s: float = 1.0):
            self.aging_s = aging_s

        def effective_priority(self, request, now):
            return request.priority - (now - request.arrival_time) / self.aging_s

        def order_waiting(self, waiting, now):
            return sorted(waiting, key=lambda r: (self.effective_priority(r, now), r.arrival_time))

        def choose_victim(self, running):
            return max(running, key=lambda r: (r.priority, r.arrival_time))

    # Scheduler(kv_cache_manager, AgingPriorityPolicy(aging_s=0.5), ...) or, after
    # register_policy("aging", AgingPriorityPolicy), Scheduler(kv_cache_manager, "aging", ...).

Worked example: swap long requests, recompute short ones. Recomputing a victim costs a forward
over all its tokens; swapping costs two copies of its blocks over the host link, about
proportional to its tokens too but far cheaper per token, and a fixed cost per copy. So swapping
pays off for victims with many computed tokens; a short one is cheaper to recompute, and leaves
the host pool to the long ones.

    from jaxllm.core.policies import FCFSPolicy

    class SwapLongPolicy(FCFSPolicy):
        name = "swap_long"

        def __init__(self, min_swap_tokens: int = 256):
            self.min_swap_tokens = min_swap_tokens

        def preemption_mode(self, victim):
            return "swap" if victim.num_computed_tokens >= self.min_swap_tokens else "recompute"

    # LLM(model, scheduling_policy=SwapLongPolicy(128)): the engine sees the hook and allocates
    # the host pool (swap_space) even under preemption_mode="recompute".

(tests/test_policies.py executes these examples, so they stay correct.)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from jaxllm.request import Request


class SchedulingPolicy:
    """Base policy: queue order, admit everyone, preempt the most recently admitted request."""

    name: str = "base"

    def begin_admission(self, running: list[Request], now: float) -> None:
        """Called once per step before admission; `running` = requests continuing this step."""

    def order_waiting(self, waiting: list[Request], now: float) -> list[Request]:
        """Admission order. Default: queue order (preempted requests first, then arrival)."""
        return list(waiting)

    def can_admit(self, request: Request, running: list[Request]) -> bool:
        """Whether `request` may join `running` now (seats, budget and blocks are checked apart)."""
        return True

    def choose_victim(self, running: list[Request]) -> Request:
        """Preemption victim among `running` (non-empty, admission order). Default: last admitted."""
        return running[-1]

    def preemption_mode(self, victim: Request) -> str | None:
        """"recompute", "swap", or None for the engine's configured preemption_mode (default)."""
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class FCFSPolicy(SchedulingPolicy):
    """First come, first served: arrival order; the latest arrival is preempted first."""

    name = "fcfs"

    def order_waiting(self, waiting, now):
        # sorted() is stable, so equal arrival times keep queue order.
        return sorted(waiting, key=lambda r: r.arrival_time)

    def choose_victim(self, running):
        # max() returns the first maximal element; reversed() makes ties pick the last admitted.
        return max(reversed(running), key=lambda r: r.arrival_time)


class PriorityPolicy(SchedulingPolicy):
    """Lower `priority` value first (vLLM), arrival breaks ties; victim = worst priority, then latest."""

    name = "priority"

    def order_waiting(self, waiting, now):
        return sorted(waiting, key=lambda r: (r.priority, r.arrival_time))

    def choose_victim(self, running):
        return max(reversed(running), key=lambda r: (r.priority, r.arrival_time))


class SJFPolicy(FCFSPolicy):
    """Shortest job first: shortest prompt first (arrival breaks ties); victim as FCFS.

    The prompt length is the only job size known up front (outputs end at EOS). The victim is the
    latest arrival rather than the longest job, so a long job that has started is not thrown back
    repeatedly by a stream of short ones.
    """

    name = "sjf"

    def order_waiting(self, waiting, now):
        return sorted(waiting, key=lambda r: (len(r.prompt_token_ids), r.arrival_time))


class StaticBatchPolicy(FCFSPolicy):
    """Static batching (like HF generate): admit only when nothing is running, then drain.

    A batch forms in a step that starts with no running request; it takes as many waiting requests
    (in arrival order) as seats, budget and blocks allow, and nobody joins until all have finished.
    Requests preempted out of a batch rejoin with the next batch.
    """

    name = "static"

    def __init__(self) -> None:
        self._batch_open = True

    def begin_admission(self, running, now):
        self._batch_open = not running

    def can_admit(self, request, running):
        return self._batch_open


POLICIES: dict[str, type[SchedulingPolicy]] = {
    "fcfs": FCFSPolicy,
    "priority": PriorityPolicy,
    "sjf": SJFPolicy,
    "static": StaticBatchPolicy,
}


def register_policy(name: str, cls: type[SchedulingPolicy]) -> None:
    """Make `cls` available to `get_policy(name)` (and so to configs naming policies by string)."""
    if not (isinstance(cls, type) and issubclass(cls, SchedulingPolicy)):
        raise TypeError(f"policy {name!r} must be a SchedulingPolicy subclass, got {cls!r}")
    POLICIES[name.lower()] = cls


def policy_chooses_preemption_mode(policy) -> bool:
    """Whether a policy (name, class or instance) overrides `preemption_mode`, so it may swap
    even when the engine's mode is "recompute" (the engine then allocates the host pool)."""
    cls = policy if isinstance(policy, type) else type(policy)
    if isinstance(policy, str):
        cls = POLICIES.get(policy.lower(), SchedulingPolicy)
    if not (isinstance(cls, type) and issubclass(cls, SchedulingPolicy)):
        return False
    return cls.preemption_mode is not SchedulingPolicy.preemption_mode


def get_policy(name_or_instance: str | SchedulingPolicy | type[SchedulingPolicy] | None) -> SchedulingPolicy:
    """A fresh policy for a registered name (case-insensitive), a class, or an instance as is.

    None means "fcfs". Each name gives a new instance, because policies may keep per-scheduler state.
    """
    if name_or_instance is None:
        return FCFSPolicy()
    if isinstance(name_or_instance, SchedulingPolicy):
        return name_or_instance
    if isinstance(name_or_instance, type) and issubclass(name_or_instance, SchedulingPolicy):
        return name_or_instance()
    if isinstance(name_or_instance, str):
        cls = POLICIES.get(name_or_instance.lower())
        if cls is not None:
            return cls()
    raise ValueError(
        f"unknown scheduling policy {name_or_instance!r}; valid: {', '.join(sorted(POLICIES))} "
        f"or a SchedulingPolicy instance"
    )
