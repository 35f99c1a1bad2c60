"""Host side of sampling: per-request SamplingParams -> padded numpy arrays + static SamplingFlags.

Never imports jax. The runner turns the dict into jaxllm.sampling.SamplingInputs
(SamplingInputs.from_arrays, or device_put with its own sharding); keys equal its field names.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from jaxllm.sampling_params import SamplingFlags, SamplingParams, logprobs_bucket

# Keys of the returned dict == fields of jaxllm.sampling.SamplingInputs (a test checks this).
FIELDS = (
    "temperature",
    "top_k",
    "top_p",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "rng_keys",
    "steps",
    "mask_stop_tokens",
    "stop_token_ids",
    "prompt_token_ids",
    "output_token_ids",
)

# Row = (params, seed, prompt_token_ids, output_token_ids, eos_token_ids)
Row = tuple[SamplingParams, int, Sequence[int], Sequence[int], Sequence[int]]


def width_bucket(n: int, buckets: Sequence[int] | None = None) -> int:
    """Padded width of a per-row id list: 0 when unused, else the smallest of `buckets` >= n
    (default: a power of two >= 8).

    Penalty histories grow by one token per step; powers of two bound the number of compiled
    shapes to log2(max_model_len). A caller that wants no compiles after warm-up passes explicit
    buckets (e.g. (max_model_len,)) and warms each one up.
    """
    if n == 0:
        return 0
    if buckets is None:
        return max(8, 1 << (n - 1).bit_length())
    for b in sorted(buckets):
        if n <= b:
            return b
    raise ValueError(f"{n} token ids do not fit the largest width bucket {max(buckets)}")


def seed_to_key_data(seed: int) -> np.ndarray:
    """[2] uint32 threefry key data equal to jax.random.PRNGKey(seed) (seed taken mod 2**64)."""
    seed %= 1 << 64
    return np.array([seed >> 32, seed & 0xFFFFFFFF], np.uint32)


def build_sampling_arrays(
    rows: Sequence[Row], num_rows_padded: int, width_buckets: Sequence[int] | None = None
) -> tuple[dict[str, np.ndarray], SamplingFlags]:
    """Arrays for SamplingInputs ([num_rows_padded, ...], padding rows are greedy no-ops) and the
    SamplingFlags of this batch.

    rows[i] = (params, seed, prompt_token_ids, output_token_ids, eos_token_ids): seed is an int
    (the engine derives one for seed=None requests); output_token_ids are the tokens generated so
    far, whose count is the row's RNG step and decides whether min_tokens still masks stop ids.
    width_buckets: allowed widths of the [S, M/Lp/Lo] id arrays (see width_bucket).
    """
    n, s = len(rows), num_rows_padded
    if n > s:
        raise ValueError(f"{n} rows do not fit num_rows_padded={s}")

    temperature = np.zeros(s, np.float32)
    top_k = np.zeros(s, np.int32)
    top_p = np.ones(s, np.float32)
    min_p = np.zeros(s, np.float32)
    repetition = np.ones(s, np.float32)
    presence = np.zeros(s, np.float32)
    frequency = np.zeros(s, np.float32)
    rng_keys = np.zeros((s, 2), np.uint32)
    steps = np.zeros(s, np.int32)
    mask_stop = np.zeros(s, np.bool_)

    stop_lists: list[list[int]] = [[] for _ in range(s)]
    prompt_lists: list[Sequence[int]] = [() for _ in range(s)]
    output_lists: list[Sequence[int]] = [() for _ in range(s)]
    any_random = any_top_k = any_top_p = any_min_p = False
    num_logprobs = 0

    for i, (params, seed, prompt_ids, output_ids, eos_ids) in enumerate(rows):
        num_out = len(output_ids)
        temperature[i] = params.temperature
        repetition[i] = params.repetition_penalty
        presence[i] = params.presence_penalty
        frequency[i] = params.frequency_penalty
        rng_keys[i] = seed_to_key_data(int(seed))
        steps[i] = num_out
        if not params.greedy:
            # Greedy rows keep neutral top_k/top_p/min_p (SamplingParams resets them) so they
            # never switch on the sort.
            top_k[i], top_p[i], min_p[i] = params.top_k, params.top_p, params.min_p
            any_random = True
            any_top_k |= params.top_k > 0
            any_top_p |= params.top_p < 1.0
            any_min_p |= params.min_p > 0.0
        if num_out < params.min_tokens:
            stop_lists[i] = params.all_stop_token_ids(eos_ids)
            mask_stop[i] = bool(stop_lists[i])
        if params.repetition_penalty != 1.0:
            prompt_lists[i] = prompt_ids
        if params.has_penalties:
            output_lists[i] = output_ids
        num_logprobs = max(num_logprobs, params.logprobs or 0)

    arrays = dict(
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        repetition_penalty=repetition,
        presence_penalty=presence,
        frequency_penalty=frequency,
        rng_keys=rng_keys,
        steps=steps,
        mask_stop_tokens=mask_stop,
        stop_token_ids=_pad_ids(stop_lists, width_buckets),
        prompt_token_ids=_pad_ids(prompt_lists, width_buckets),
        output_token_ids=_pad_ids(output_lists, width_buckets),
    )
    flags = SamplingFlags(
        any_random=any_random,
        any_penalties=any(p.has_penalties for p, *_ in rows),
        any_min_tokens=bool(mask_stop.any()),
        any_top_k=any_top_k,
        any_top_p=any_top_p,
        any_min_p=any_min_p,
        num_logprobs=logprobs_bucket(num_logprobs),
    )
    return arrays, flags


def _pad_ids(lists: Sequence[Sequence[int]], buckets) -> np.ndarray:
    """[len(lists), width_bucket(longest)] int32, -1 padded."""
    width = width_bucket(max((len(x) for x in lists), default=0), buckets)
    out = np.full((len(lists), width), -1, np.int32)
    for i, ids in enumerate(lists):
        out[i, : len(ids)] = ids
    return out
