"""SamplingParams (how to sample one request) and BeamSearchParams, with vLLM's names and meanings.

Host-only: this module never imports jax, so the scheduler and the batch builder can use it.
"""

from __future__ import annotations

import dataclasses
import math
import numbers

from jaxllm.runner.instrument_inputs import normalize_hidden_layers, normalize_interventions

# vLLM treats temperatures below this as greedy (argmax); the device sampler uses the same threshold.
SAMPLING_EPS = 1e-5
# vLLM clamps tiny positive temperatures up to this, because logits / 1e-4 overflow to inf/NaN in f32.
MIN_TEMPERATURE = 1e-2
# Largest top-N for logprobs / prompt_logprobs (vLLM's default max_logprobs). The sampler always
# has room for this many (its width is data-independent, so no request compiles a new step).
MAX_LOGPROBS = 20


@dataclasses.dataclass
class SamplingParams:
    """How to sample one request's output. Field names and meanings follow vLLM.

    Greedy requests (temperature < 1e-5) have top_k/top_p/min_p reset to their neutral values,
    as vLLM does, so they never switch on work the sampler could skip.
    """

    n: int = 1  # >= 1 samples of the prompt (one RequestOutput with n CompletionOutputs); sample i
    # uses seed + i when seed is set (vLLM)
    temperature: float = 1.0  # >= 0; < 1e-5 means greedy; (1e-5, 1e-2) is clamped to 1e-2 (vLLM)
    top_p: float = 1.0  # (0, 1]: keep the smallest set of most likely tokens with mass >= top_p
    top_k: int = 0  # 0 or -1 = off (-1 is normalised to 0); else keep the k most likely tokens
    min_p: float = 0.0  # [0, 1]: drop tokens with prob < min_p * max prob
    # > 0; applies to tokens seen in the prompt OR the output: logit>0 -> logit/p, else logit*p.
    repetition_penalty: float = 1.0
    # [-2, 2]; apply to OUTPUT tokens only: logit -= frequency*count + presence*(count > 0).
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None  # None: the engine derives one; a request's samples depend only on it
    max_tokens: int | None = 16  # >= 1; None: until max_model_len (vLLM)
    min_tokens: int = 0  # [0, max_tokens]: EOS and stop_token_ids are masked until this many outputs
    stop: str | list[str] | None = None  # normalised to a list; strings that end generation
    stop_token_ids: list[int] | None = None  # normalised to a list; token ids that end generation
    ignore_eos: bool = False  # keep generating after EOS (EOS is then not a stop token)
    include_stop_str_in_output: bool = False
    logprobs: int | None = None  # [0, 20]: top-N logprobs per sampled token (plus the sampled one)
    prompt_logprobs: int | None = None  # [0, 20]: same, for each prompt token
    skip_special_tokens: bool = True
    # Research instruments (jaxllm/runner/instrument_inputs.py). output_hidden_states: indices
    # as transformers' hidden_states[i] (i = input of layer i, num_layers = after the final norm;
    # negative from the end) -> RequestOutput.prompt_hidden_states / CompletionOutput.hidden_states,
    # numpy [num_tokens, len(indices), hidden]. residual_interventions: {layer: [hidden] float
    # vector} added to the residual at the input of that layer, for every token of the request.
    output_hidden_states: list[int] | None = None
    residual_interventions: dict | None = None

    def __post_init__(self) -> None:
        _check_int("n", self.n)
        if self.n < 1:
            raise ValueError(f"n must be an int >= 1, got {self.n!r}")
        self.stop = _normalize_stop(self.stop)
        self.stop_token_ids = _normalize_stop_token_ids(self.stop_token_ids)
        self.output_hidden_states = normalize_hidden_layers(self.output_hidden_states)
        self.residual_interventions = normalize_interventions(self.residual_interventions)
        self._verify()
        if self.top_k == -1:
            self.top_k = 0  # vLLM < 0.10 spelled "off" as -1
        if self.temperature < SAMPLING_EPS:
            # Greedy: these cannot change argmax, so neutralise them (as vLLM does).
            self.temperature = 0.0
            self.top_p, self.top_k, self.min_p = 1.0, 0, 0.0
        elif self.temperature < MIN_TEMPERATURE:
            self.temperature = MIN_TEMPERATURE

    def _verify(self) -> None:
        _check_number("temperature", self.temperature, lambda v: v >= 0, ">= 0")
        _check_int("top_k", self.top_k)
        if not (self.top_k in (0, -1) or self.top_k >= 1):
            raise ValueError(f"top_k must be 0 or -1 (disabled) or >= 1, got {self.top_k!r}")
        _check_number("top_p", self.top_p, lambda v: 0 < v <= 1, "in (0, 1]")
        _check_number("min_p", self.min_p, lambda v: 0 <= v <= 1, "in [0, 1]")
        _check_number("repetition_penalty", self.repetition_penalty, lambda v: v > 0, "> 0")
        for name in ("presence_penalty", "frequency_penalty"):
            _check_number(name, getattr(self, name), lambda v: -2 <= v <= 2, "in [-2, 2]")
        if self.seed is not None:
            _check_int("seed", self.seed)
        if self.max_tokens is not None:
            _check_int("max_tokens", self.max_tokens)
            if self.max_tokens < 1:
                raise ValueError(f"max_tokens must be >= 1 or None, got {self.max_tokens!r}")
        _check_int("min_tokens", self.min_tokens)
        if not 0 <= self.min_tokens <= (self.max_tokens if self.max_tokens is not None else self.min_tokens):
            raise ValueError(
                f"min_tokens must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens!r}"
            )
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None:
                _check_int(name, v)
                if not 0 <= v <= MAX_LOGPROBS:
                    raise ValueError(
                        f"{name} must be None or in [0, {MAX_LOGPROBS}], got {v!r}"
                    )

    @property
    def greedy(self) -> bool:
        return self.temperature < SAMPLING_EPS

    @property
    def has_penalties(self) -> bool:
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
        )

    def all_stop_token_ids(self, eos_token_ids=()) -> list[int]:
        """Token ids that end generation: stop_token_ids, plus EOS unless ignore_eos.

        min_tokens masks exactly these (vLLM's _all_stop_token_ids).
        """
        ids = list(self.stop_token_ids)
        if not self.ignore_eos:
            ids += [int(t) for t in eos_token_ids if int(t) not in ids]
        return ids


@dataclasses.dataclass
class BeamSearchParams:
    """LLM.beam_search's parameters (vLLM's names and meanings; see jaxllm/beam_search.py).

    Each step extends every live beam by its 2 * beam_width most likely tokens and keeps the
    beam_width best candidates; a candidate ending in EOS (unless ignore_eos) is complete.
    """

    beam_width: int  # [1, MAX_LOGPROBS // 2]: each beam's candidates are its top 2 * beam_width
    max_tokens: int  # >= 1 tokens generated at most
    ignore_eos: bool = False
    temperature: float = 0.0  # the one-token steps sample at this temperature (0: greedy)
    length_penalty: float = 1.0  # score = cum_logprob / len(tokens incl. prompt) ** length_penalty
    include_stop_str_in_output: bool = False  # kept for vLLM compatibility (no stop strings here)

    def __post_init__(self) -> None:
        _check_int("beam_width", self.beam_width)
        if not 1 <= self.beam_width <= MAX_LOGPROBS // 2:
            raise ValueError(f"beam_width must be in [1, {MAX_LOGPROBS // 2}], got {self.beam_width!r}")
        _check_int("max_tokens", self.max_tokens)
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens!r}")
        _check_number("temperature", self.temperature, lambda v: v >= 0, ">= 0")
        _check_number("length_penalty", self.length_penalty, lambda v: True, "")


def _check_number(name, value, ok, allowed: str) -> None:
    # numbers.Real admits numpy scalars; bools are rejected because they are almost always a bug.
    # ok is a predicate so it only runs once the type is known to be comparable.
    bad_type = isinstance(value, bool) or not isinstance(value, numbers.Real)
    if bad_type or not math.isfinite(value) or not ok(value):
        raise ValueError(f"{name} must be a finite number {allowed}, got {value!r}")


def _check_int(name, value) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an int, got {value!r}")


def _normalize_stop(stop) -> list[str]:
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    stop = list(stop)
    for s in stop:
        if not isinstance(s, str) or not s:
            raise ValueError(f"stop must be a non-empty string or a list of them, got {stop!r}")
    return stop


def _normalize_stop_token_ids(ids) -> list[int]:
    if ids is None:
        return []
    ids = list(ids)
    for t in ids:
        if isinstance(t, bool) or not isinstance(t, numbers.Integral) or t < 0:
            raise ValueError(f"stop_token_ids must be a list of ints >= 0, got {ids!r}")
    return [int(t) for t in ids]
