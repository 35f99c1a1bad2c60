"""What the engine keeps per request beyond the scheduler's Request, and how it becomes a
vLLM-style RequestOutput: text (with stop strings), sampled-token logprobs, prompt logprobs.

Host only: the device step returns a StepOutputs of numpy arrays (see runner.paged_step), read here.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxllm.detokenizer import Detokenizer
from jaxllm.runner.instrument_inputs import HiddenStateBuffer
from jaxllm.request import CompletionOutput, Logprob, Request, RequestOutput
from jaxllm.runner.step_io import StepOutputs


@dataclasses.dataclass
class RequestState:
    seed: int  # the request's sampling seed (its own, or drawn from the engine's generator)
    detokenizer: Detokenizer | None  # None without a tokenizer: text stays ""
    logprobs: list = dataclasses.field(default_factory=list)  # one {token_id: Logprob} per output
    cumulative_logprob: float = 0.0  # sum of the sampled tokens' logprobs, kept as they come

    def add_logprob(self, entry: dict, token: int) -> None:
        """Record a sampled token's logprob entry (O(1): no re-summing every step)."""
        self.logprobs.append(entry)
        self.cumulative_logprob += entry[token].logprob
    prompt_logprobs: list | None = None  # [None, {token_id: Logprob}, ...] when requested
    hidden_states: HiddenStateBuffer | None = None  # SamplingParams.output_hidden_states
    interventions: dict | None = None  # resolved residual_interventions {layer: [H] f32}


class LogprobFormatter:
    """Builds vLLM's {token_id: Logprob} entries from the step's top-k arrays."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def entry(self, top_ids: np.ndarray, top_lps: np.ndarray, token: int, token_lp) -> dict[int, Logprob]:
        """The top-k (rank 1 = most likely) plus `token`, whose rank is None outside the top-k."""
        out = {}
        for rank, (tid, lp) in enumerate(zip(top_ids.tolist(), top_lps.tolist()), start=1):
            out[int(tid)] = Logprob(float(lp), rank, self._decode(int(tid)))
        if token not in out:
            out[token] = Logprob(float(token_lp), None, self._decode(token))
        return out

    def sampled(self, result: StepOutputs, row: int, token: int, k: int) -> dict[int, Logprob]:
        """Entry of the token sampled for batch row `row`, with the top-k shown."""
        return self.entry(result.top_token_ids[row][:k], result.top_logprobs[row][:k], token,
                          result.logprobs[row])

    def _decode(self, token: int) -> str | None:
        return None if self.tokenizer is None else self.tokenizer.decode([token])


def prompt_logprob_targets(scheduled, cu_q_lens: np.ndarray, num_tokens_padded: int) -> np.ndarray | None:
    """[T] int32 targets (the token after each scheduled token) for a step, or None when no
    scheduled request wants prompt_logprobs (the step then skips them)."""
    if all(item.request.sampling_params.prompt_logprobs is None for item in scheduled):
        return None
    targets = np.zeros(num_tokens_padded, np.int32)
    for i, item in enumerate(scheduled):
        req, start = item.request, item.num_computed_tokens
        nxt = req.token_slice(start + 1, start + item.num_new_tokens + 1)
        targets[cu_q_lens[i] : cu_q_lens[i] + len(nxt)] = nxt
    return targets


def collect_prompt_logprobs(scheduled, cu_q_lens, result: StepOutputs, states: dict[str, RequestState],
                            fmt: LogprobFormatter) -> None:
    """Append prompt-logprob entries for prompt positions seen for the first time; positions
    recomputed after a preemption were recorded already and are skipped."""
    for i, item in enumerate(scheduled):
        req: Request = item.request
        k = req.sampling_params.prompt_logprobs
        if k is None or req.request_id not in states:  # not there: aborted while in flight
            continue
        state = states[req.request_id]
        if state.prompt_logprobs is None:
            state.prompt_logprobs = [None]  # the first prompt token has no logprob (vLLM)
        entries = state.prompt_logprobs
        start = item.num_computed_tokens  # at schedule time (async scheduling advances it at dispatch)
        for j in range(item.num_new_tokens):
            pos = start + j + 1  # token (start + j) predicts prompt token `pos`
            if pos != len(entries) or pos >= req.num_prompt_tokens:
                continue
            t = cu_q_lens[i] + j
            entries.append(fmt.entry(result.prompt_top_token_ids[t][:k],
                                     result.prompt_top_logprobs[t][:k],
                                     req.prompt_token_ids[pos], result.prompt_logprobs[t]))


def make_output(req: Request, state: RequestState) -> RequestOutput:
    """The request's output so far (vLLM's cumulative RequestOutput)."""
    wants_logprobs = req.sampling_params.logprobs is not None
    hidden = state.hidden_states
    completion = CompletionOutput(
        index=0,
        text=state.detokenizer.text if state.detokenizer is not None else "",
        token_ids=list(req.output_token_ids),
        cumulative_logprob=state.cumulative_logprob if wants_logprobs else None,
        logprobs=list(state.logprobs) if wants_logprobs else None,
        finish_reason=req.finish_reason,
        stop_reason=req.stop_reason,
        hidden_states=hidden.view(req.num_prompt_tokens, req.num_tokens) if hidden is not None else None,
    )
    return RequestOutput(
        request_id=req.request_id,
        prompt=req.prompt,
        prompt_token_ids=list(req.prompt_token_ids),
        prompt_logprobs=state.prompt_logprobs,
        outputs=[completion],
        finished=req.is_finished,
        metrics=req.metrics,
        error=req.error,
        num_cached_tokens=max(req.num_cached_tokens, 0),  # -1 until first admitted
        prompt_hidden_states=hidden.view(0, req.num_prompt_tokens) if hidden is not None else None,
    )


class ParentRequest:
    """Fan-in of a request with SamplingParams(n > 1), run as n child requests (vLLM v1's way).

    Child i is its own Request (id f"{i}_{request_id}", seed + i when a seed is set) whose blocks
    the scheduler manages like any other; the prompt's blocks are shared through the prefix cache
    where it is on. The caller sees one RequestOutput with n CompletionOutputs, index 0..n-1.
    """

    def __init__(self, request_id: str, child_ids: list[str]):
        self.request_id = request_id
        self.child_ids = child_ids
        self._latest: list[RequestOutput | None] = [None] * len(child_ids)

    @staticmethod
    def child_id(request_id: str, index: int) -> str:
        return f"{index}_{request_id}"

    def update(self, index: int, child: RequestOutput) -> RequestOutput:
        """Record child `index`'s latest output; return the parent's cumulative output."""
        completion = dataclasses.replace(child.outputs[0], index=index)
        self._latest[index] = dataclasses.replace(child, outputs=[completion])
        outputs = [o.outputs[0] for o in self._latest if o is not None]
        first = next(o for o in self._latest if o is not None)
        return RequestOutput(
            request_id=self.request_id,
            prompt=first.prompt,
            prompt_token_ids=first.prompt_token_ids,
            # Only sample 0 asks for prompt logprobs (they are the same for every sample).
            prompt_logprobs=self._latest[0].prompt_logprobs if self._latest[0] is not None else None,
            outputs=outputs,
            finished=all(o is not None and o.finished for o in self._latest),
            metrics=first.metrics,  # the first sample to report (its TTFT is the request's)
            error=next((o.error for o in self._latest if o is not None and o.error), None),
            num_cached_tokens=first.num_cached_tokens,
            prompt_hidden_states=self._latest[0].prompt_hidden_states if self._latest[0] is not None else None,
        )
