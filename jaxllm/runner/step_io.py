"""What crosses the host/device boundary in one engine step, as typed records. Host only: never
imports jax.

StepInputs is built once per step by Engine.build_step_inputs (warm-up, tests and benchmarks use
the same pieces); the runner registers StepOutputs as a pytree, so the jitted step returns it
directly and the host reads numpy arrays by name (no string-keyed dicts).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxllm.runner.batch import BatchInputs
from jaxllm.runner.sampling_inputs import GENERAL, GREEDY, SamplingInputs

# Step variants per token bucket, in the order warm-up compiles them: (sampler, prompt_logprobs).
# A step with prompt logprobs always takes the GENERAL sampler, so there is no fourth variant.
STEP_VARIANTS = ((GREEDY, False), (GENERAL, False), (GENERAL, True))


@dataclasses.dataclass(frozen=True)
class StepInputs:
    """Everything the runner needs for one step (numpy, padded to a token bucket)."""

    batch: BatchInputs  # tokens, positions, block tables, ... ([T] / [S] arrays)
    sampling: SamplingInputs  # per-row sampling parameters ([S] / [S, ...] arrays)
    sampler: str  # GREEDY or GENERAL (a jit static)
    prompt_targets: np.ndarray | None = None  # [T] int32 next prompt tokens; None: no prompt logprobs

    @property
    def prompt_logprobs(self) -> bool:
        return self.prompt_targets is not None


@dataclasses.dataclass(frozen=True)
class StepOutputs:
    """Outputs of one step over T padded tokens and S padded rows (numpy on the host)."""

    token_ids: np.ndarray  # [S] int32: the token sampled for each row
    logprobs: np.ndarray  # [S] f32: raw logprob of token_ids
    top_logprobs: np.ndarray  # [S, K] f32 descending; K = 0 (greedy sampler) or min(20, V)
    top_token_ids: np.ndarray  # [S, K] int32
    # Only in steps with prompt logprobs (else None): for each token, the logprob of the next one.
    prompt_logprobs: np.ndarray | None = None  # [T] f32
    prompt_top_logprobs: np.ndarray | None = None  # [T, min(20, V)] f32 descending
    prompt_top_token_ids: np.ndarray | None = None  # [T, min(20, V)] int32
