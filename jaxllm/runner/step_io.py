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
from jaxllm.runner.instrument_inputs import InstrumentInputs
from jaxllm.runner.sampling_inputs import GENERAL, GREEDY, SamplingInputs

# Step variants per token bucket, in the order warm-up compiles them: (sampler, prompt_logprobs).
# A step with prompt logprobs always takes the GENERAL sampler, so there is no fourth variant.
STEP_VARIANTS = ((GREEDY, False), (GENERAL, False), (GENERAL, True))
# The instrumented variants (hidden-state capture / residual interventions, runner/instrument_inputs.py):
# only steps where some row asks for them, always with the GENERAL sampler (so not 3 more). They
# compile on first use; Engine.warmup(instrumented=True) compiles them up front.
INSTRUMENTED_STEP_VARIANTS = ((GENERAL, False), (GENERAL, True))
# What get_stats()["num_step_variants"] is bounded by, per token bucket.
MAX_STEP_VARIANTS_PER_BUCKET = len(STEP_VARIANTS) + len(INSTRUMENTED_STEP_VARIANTS)


@dataclasses.dataclass(frozen=True)
class StepInputs:
    """Everything the runner needs for one step (numpy, padded to a token bucket)."""

    batch: BatchInputs  # tokens, positions, block tables, ... ([T] / [S] arrays)
    sampling: SamplingInputs  # per-row sampling parameters ([S] / [S, ...] arrays)
    sampler: str  # GREEDY or GENERAL (a jit static)
    prompt_targets: np.ndarray | None = None  # [T] int32 next prompt tokens; None: no prompt logprobs
    instruments: InstrumentInputs | None = None  # None: no row captures or intervenes

    @property
    def prompt_logprobs(self) -> bool:
        return self.prompt_targets is not None

    @property
    def instrumented(self) -> bool:
        return self.instruments is not None


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
    # Only in instrumented steps: the residual stream at every hidden-state index, on the device
    # only ([L + 1, T, H]; None once on the host), and the captured pairs gathered from it.
    residuals: np.ndarray | None = None  # [L + 1, T, H] (device)
    hidden_states: np.ndarray | None = None  # [R, H] f32 (host), InstrumentInputs.capture_* order
