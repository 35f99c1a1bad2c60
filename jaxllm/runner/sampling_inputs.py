"""Host side of sampling: per-request SamplingParams -> one SamplingInputs of numpy arrays.

Never imports jax. Every sampling parameter is data, never a jit static, so any mix of requests
runs on one of two compiled samplers per token bucket (jaxllm/sampling.py):

  GREEDY   every row greedy, with no penalties, no min_tokens mask, no top logprobs and no prompt
           logprobs in the step: argmax only (the common case; nothing else is paid for)
  GENERAL  everything else; rows switch features on by their values, and lax.cond skips the work
           no row of the step uses

The compiled step count is therefore (number of token buckets) x 3 at most (GREEDY, GENERAL, and
GENERAL with prompt logprobs), whatever the requests ask for. SamplingInputs is also the device
type: jaxllm/sampling.py registers it as a pytree, so one typed record crosses the boundary.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from jaxllm.sampling_params import SamplingParams

GREEDY = "greedy"
GENERAL = "general"

# Row = (params, seed, prompt_token_ids, output_token_ids, eos_token_ids)
Row = tuple[SamplingParams, int, Sequence[int], Sequence[int], Sequence[int]]


@dataclasses.dataclass(frozen=True)
class SamplingInputs:
    """Per-row sampling parameters of one step (S rows; padding rows are greedy no-ops).

    Fields hold numpy arrays on the host and jax arrays inside the jitted step. The two wide
    arrays are None when no row of a GENERAL step uses them: the runner then passes a neutral
    device-resident constant instead of shipping S x H or S x V values every step.
    """

    temperature: np.ndarray  # [S] f32; 0 = greedy
    top_k: np.ndarray  # [S] int32; 0 = off
    top_p: np.ndarray  # [S] f32; 1 = off
    min_p: np.ndarray  # [S] f32; 0 = off
    repetition_penalty: np.ndarray  # [S] f32; 1 = off
    presence_penalty: np.ndarray  # [S] f32; 0 = off
    frequency_penalty: np.ndarray  # [S] f32; 0 = off
    rng_keys: np.ndarray  # [S, 2] uint32: threefry key data of jax.random.PRNGKey(seed)
    steps: np.ndarray  # [S] int32: output tokens generated so far (folded into the key)
    num_top_logprobs: np.ndarray  # [S] int32: top logprobs the row returns (0 = none)
    num_prompt_tokens: np.ndarray  # [S] int32: length of the prompt part of token_history
    # [S, H] int32: prompt then output ids of rows with penalties, -1 padded. H = history_width
    # (max_model_len) in GENERAL steps, 0 in GREEDY steps; None: no row has penalties.
    token_history: np.ndarray | None
    # [S, V] bool: tokens masked because the row has fewer than min_tokens outputs. V = vocab in
    # GENERAL steps, 0 in GREEDY steps; None: no row masks anything.
    stop_token_mask: np.ndarray | None

    @property
    def num_rows(self) -> int:
        return int(self.temperature.shape[0])

    def with_neutral_arrays(self, history_width: int, vocab_size: int) -> "SamplingInputs":
        """A copy whose None arrays are materialised as neutral numpy arrays (for direct callers
        of the sampler; the runner keeps device-resident neutral arrays instead)."""
        s = self.num_rows
        return dataclasses.replace(
            self,
            token_history=self.token_history if self.token_history is not None
            else np.full((s, history_width), -1, np.int32),
            stop_token_mask=self.stop_token_mask if self.stop_token_mask is not None
            else np.zeros((s, vocab_size), np.bool_),
        )


class OutputsWithPlaceholders(Sequence):
    """A request's output ids followed by `num_placeholders` tokens still on the device (async
    scheduling): a Row's output_token_ids whose length, the row's RNG step and min_tokens count,
    includes them. Reading a placeholder raises, so a row that needs the ids themselves
    (penalties' history) cannot be built before they arrive."""

    def __init__(self, output_token_ids: Sequence[int], num_placeholders: int):
        self._ids, self._extra = output_token_ids, num_placeholders

    def __len__(self) -> int:
        return len(self._ids) + self._extra

    def __getitem__(self, index):
        if isinstance(index, slice) or not 0 <= index < len(self._ids):
            raise IndexError("an in-flight output token is not on the host yet")
        return self._ids[index]


def seed_to_key_data(seed: int) -> np.ndarray:
    """[2] uint32 threefry key data equal to jax.random.PRNGKey(seed) (seed taken mod 2**64)."""
    seed %= 1 << 64
    return np.array([seed >> 32, seed & 0xFFFFFFFF], np.uint32)


def needs_general_sampler(params: SamplingParams, num_output_tokens: int, eos_token_ids) -> bool:
    """Whether a row needs the GENERAL sampler in a step where it has `num_output_tokens` outputs."""
    return (
        not params.greedy
        or params.has_penalties
        or bool(params.logprobs)
        or (num_output_tokens < params.min_tokens and bool(params.all_stop_token_ids(eos_token_ids)))
    )


def build_sampling_inputs(
    rows: Sequence[Row],
    num_rows_padded: int,
    *,
    vocab_size: int,
    history_width: int,
    force_general: bool = False,
) -> tuple[SamplingInputs, str]:
    """(SamplingInputs with [num_rows_padded, ...] arrays, GREEDY or GENERAL) for one step.

    rows[i] = (params, seed, prompt_token_ids, output_token_ids, eos_token_ids): seed is an int
    (the engine derives one for seed=None requests); output_token_ids are the tokens generated so
    far, whose count is the row's RNG step and decides whether min_tokens still masks stop ids.
    history_width: width of token_history in GENERAL steps (max_model_len: a request's prompt
    plus outputs never exceed it). force_general: use GENERAL even if every row could run GREEDY
    (steps with prompt logprobs, and warm-up).
    """
    n, s = len(rows), num_rows_padded
    if n > s:
        raise ValueError(f"{n} rows do not fit num_rows_padded={s}")
    general = force_general or any(needs_general_sampler(p, len(out), eos) for p, _, _, out, eos in rows)

    temperature = np.zeros(s, np.float32)
    top_k = np.zeros(s, np.int32)
    top_p = np.ones(s, np.float32)
    min_p = np.zeros(s, np.float32)
    repetition = np.ones(s, np.float32)
    presence = np.zeros(s, np.float32)
    frequency = np.zeros(s, np.float32)
    rng_keys = np.zeros((s, 2), np.uint32)
    steps = np.zeros(s, np.int32)
    num_top_logprobs = np.zeros(s, np.int32)
    num_prompt = np.zeros(s, np.int32)
    history = stop_mask = None
    if not general:
        history, stop_mask = np.zeros((s, 0), np.int32), np.zeros((s, 0), np.bool_)

    for i, (params, seed, prompt_ids, output_ids, eos_ids) in enumerate(rows):
        num_out = len(output_ids)
        rng_keys[i] = seed_to_key_data(int(seed))
        steps[i] = num_out
        if not general:
            continue  # GREEDY reads nothing else (its rows are all neutral)
        temperature[i] = params.temperature
        # Greedy rows keep neutral top_k/top_p/min_p (SamplingParams resets them).
        top_k[i], top_p[i], min_p[i] = params.top_k, params.top_p, params.min_p
        repetition[i] = params.repetition_penalty
        presence[i] = params.presence_penalty
        frequency[i] = params.frequency_penalty
        num_top_logprobs[i] = params.logprobs or 0
        num_prompt[i] = len(prompt_ids)
        if params.has_penalties:
            if history is None:
                history = np.full((s, history_width), -1, np.int32)
            total = len(prompt_ids) + num_out
            if total > history_width:
                raise ValueError(f"row {i} has {total} tokens, more than history_width={history_width}")
            history[i, : len(prompt_ids)] = prompt_ids
            history[i, len(prompt_ids) : total] = output_ids
        if num_out < params.min_tokens:
            stop_ids = params.all_stop_token_ids(eos_ids)
            if stop_ids:
                if stop_mask is None:
                    stop_mask = np.zeros((s, vocab_size), np.bool_)
                stop_mask[i, [t for t in stop_ids if t < vocab_size]] = True

    inputs = SamplingInputs(
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        repetition_penalty=repetition,
        presence_penalty=presence,
        frequency_penalty=frequency,
        rng_keys=rng_keys,
        steps=steps,
        num_top_logprobs=num_top_logprobs,
        num_prompt_tokens=num_prompt,
        token_history=history,
        stop_token_mask=stop_mask,
    )
    return inputs, GENERAL if general else GREEDY
