"""Request state and the outputs the engine hands back. Host only: never imports jax.

A request has no prefill or decode phase. It has `num_tokens` tokens (prompt + outputs so far) of
which `num_computed_tokens` have their K/V in the cache; every step the scheduler gives it some new
tokens so it catches up. When it catches up completely in a step, that step samples one more token.
"""

from __future__ import annotations

import dataclasses
import functools
import enum
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # only for annotations: the scheduler reads four fields, the rest is opaque
    from jaxllm.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"  # waiting again, with num_computed_tokens reset to 0 (recompute)
    SWAPPED = "swapped"  # waiting again, its computed KV blocks in the host pool (swap)
    FINISHED_STOPPED = "finished_stopped"
    FINISHED_LENGTH = "finished_length"
    FINISHED_ABORTED = "finished_aborted"
    FINISHED_ERROR = "finished_error"

    @property
    def is_finished(self) -> bool:
        return self in _FINISH_REASONS

    @property
    def finish_reason(self) -> str | None:
        """vLLM's finish_reason string for a finished status, None otherwise."""
        return _FINISH_REASONS.get(self)


_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
    RequestStatus.FINISHED_ERROR: "error",
}


@dataclasses.dataclass
class RequestMetrics:
    """A snapshot of one request's timings (seconds, in the engine's clock) and counts."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    num_preemptions: int = 0
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache at first admission
    # The time each output token was sampled ([num_output_tokens] seconds, appended as they come).
    token_times: list[float] = dataclasses.field(default_factory=list)
    # num_output_tokens / num_preemptions / num_cached_tokens / token_times are kept in sync by the scheduler

    @property
    def inter_token_latencies(self) -> list[float]:
        """Gaps between consecutive output tokens ([num_output_tokens - 1] seconds): vLLM's ITL."""
        t = self.token_times
        return [b - a for a, b in zip(t, t[1:])]

    @property
    def queue_time(self) -> float | None:
        """Arrival to first scheduling."""
        if self.first_scheduled_time is None:
            return None
        return self.first_scheduled_time - self.arrival_time

    @property
    def ttft(self) -> float | None:
        """Time to first token: arrival to the first sampled token."""
        if self.first_token_time is None:
            return None
        return self.first_token_time - self.arrival_time

    @property
    def mean_tpot(self) -> float | None:
        """Mean time per output token after the first (None with fewer than two outputs)."""
        if self.num_output_tokens < 2 or self.first_token_time is None or self.last_token_time is None:
            return None
        return (self.last_token_time - self.first_token_time) / (self.num_output_tokens - 1)

    @property
    def e2e_latency(self) -> float | None:
        """Arrival to finish."""
        if self.finished_time is None:
            return None
        return self.finished_time - self.arrival_time


@dataclasses.dataclass(eq=False)  # identity equality: two requests are never "the same" by value
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: tuple[int, ...] = ()
    arrival_time: float = dataclasses.field(default_factory=time.monotonic)
    priority: int = 0  # lower runs first (vLLM convention), used by PriorityPolicy
    prompt: str | None = None
    cache_salt: str | None = None  # prefix caching: requests with different salts share no block

    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = dataclasses.field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose K/V is in the cache
    # Async scheduling: tokens sampled by steps still on the device, not appended yet. The
    # scheduler counts them as tokens (a row feeds one before the host knows its id).
    num_output_placeholders: int = 0
    num_preemptions: int = 0
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    stop_reason: int | str | None = None  # stop token id or stop string that ended it; None for EOS
    error: str | None = None  # message when status is FINISHED_ERROR
    # Prefix caching. block_hashes: one chained hash per full block of all tokens, appended by the
    # KV-cache manager (it owns block_size and the seed). num_cached_tokens: tokens found in the
    # prefix cache at first admission (-1 before it, as vLLM).
    block_hashes: list[bytes] = dataclasses.field(default_factory=list, repr=False)
    num_cached_tokens: int = -1

    # Timings live in `metrics` (a live object: the engine hands it out in RequestOutput).
    # first_scheduled_time, first_token_time, last_token_time, finished_time are properties below.
    metrics: RequestMetrics = dataclasses.field(default=None, repr=False)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        self.prompt_token_ids = list(self.prompt_token_ids)
        self.eos_token_ids = tuple(int(t) for t in self.eos_token_ids)
        if self.metrics is None:
            self.metrics = RequestMetrics(arrival_time=self.arrival_time, num_prompt_tokens=len(self.prompt_token_ids))

    # -- timings (seconds, in the clock given to the scheduler / engine), stored in self.metrics --
    first_scheduled_time = property(
        lambda self: self.metrics.first_scheduled_time,
        lambda self, t: setattr(self.metrics, "first_scheduled_time", t),
    )
    first_token_time = property(
        lambda self: self.metrics.first_token_time,
        lambda self, t: setattr(self.metrics, "first_token_time", t),
    )
    last_token_time = property(
        lambda self: self.metrics.last_token_time,
        lambda self, t: setattr(self.metrics, "last_token_time", t),
    )
    finished_time = property(
        lambda self: self.metrics.finished_time,
        lambda self, t: setattr(self.metrics, "finished_time", t),
    )

    # -- sampling_params fields the scheduler uses (getattr: SamplingParams is someone else's) --
    @property
    def max_tokens(self) -> int | None:
        return getattr(self.sampling_params, "max_tokens", None)

    @property
    def min_tokens(self) -> int:
        return getattr(self.sampling_params, "min_tokens", 0) or 0

    @property
    def stop_token_ids(self) -> tuple[int, ...]:
        return tuple(getattr(self.sampling_params, "stop_token_ids", None) or ())

    @property
    def ignore_eos(self) -> bool:
        return bool(getattr(self.sampling_params, "ignore_eos", False))

    @functools.cached_property
    def stop_checks(self) -> tuple[int, bool, tuple[int, ...], int | None]:
        """(min_tokens, ignore_eos, stop_token_ids, max_tokens), read once: the scheduler checks
        them for every request every step, and a request's sampling params do not change."""
        return self.min_tokens, self.ignore_eos, self.stop_token_ids, self.max_tokens

    @property
    def skip_reading_prefix_cache(self) -> bool:
        """Prompt logprobs need every prompt token's logits, and hidden-state capture every prompt
        token's residuals, so such a request computes them all."""
        return (getattr(self.sampling_params, "prompt_logprobs", None) is not None
                or getattr(self.sampling_params, "output_hidden_states", None) is not None)

    # -- derived state --
    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        """Prompt + outputs as a new list (O(num_tokens): per-step code uses token_slice)."""
        return self.prompt_token_ids + self.output_token_ids

    def token_slice(self, start: int, stop: int) -> list[int]:
        """all_token_ids[start:stop] without building the whole list: a step feeds a few tokens
        of a long request, and concatenating every step would be quadratic over its life."""
        p = len(self.prompt_token_ids)
        if stop <= p:
            return self.prompt_token_ids[start:stop]
        if start >= p:
            return self.output_token_ids[start - p : stop - p]
        return self.prompt_token_ids[start:] + self.output_token_ids[: stop - p]

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    def __repr__(self) -> str:
        return (
            f"Request({self.request_id!r}, status={self.status.name}, prompt={self.num_prompt_tokens}, "
            f"out={self.num_output_tokens}, computed={self.num_computed_tokens})"
        )


@dataclasses.dataclass
class Logprob:
    """vLLM's per-token logprob entry: CompletionOutput.logprobs is a list of {token_id: Logprob}."""

    logprob: float
    rank: int | None = None  # 1 = most likely; None when the sampled token is outside the top-k shown
    decoded_token: str | None = None


@dataclasses.dataclass
class CompletionOutput:
    """One completion of a request (vLLM field names; n=1, so index is 0)."""

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: Any = None  # per-token list of {token_id: logprob} when requested
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error" | None while running
    stop_reason: int | str | None = None
    # SamplingParams.output_hidden_states: [num_output_tokens - 1, num_asked, hidden] float32, row j
    # the residual stream at generated token j's position (the last generated token is never run
    # through the model, as in transformers' generate). None when not asked.
    hidden_states: Any = None

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclasses.dataclass
class RequestOutput:
    """What the engine returns for a request after a step (vLLM field names)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: Any
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics | None = None
    error: str | None = None
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache at admission
    # SamplingParams.output_hidden_states: [num_prompt_tokens, num_asked, hidden] float32 (every
    # prompt token is computed: such requests skip the prefix-cache lookup). None when not asked.
    prompt_hidden_states: Any = None
