"""Beam search over the engine, as vLLM does it: every step runs each live beam as a one-token
request asking for its top 2 * beam_width logprobs, and keeps the beam_width best candidates.

Beams share KV blocks through the prefix cache: a beam's request is its parent's tokens plus
one, so its full blocks are the parent's (or a sibling's) cached blocks and only the last,
partly filled block is recomputed. That is copy-on-write at block granularity without a device
copy; experiments/bench_sharing.py measures the blocks it saves. Host only: never imports jax.

Semantics (vLLM's, which differ from transformers' in two ways, both documented in the README):
  * a candidate whose token is EOS (unless ignore_eos) is complete; search continues for
    max_tokens steps with the live beams (no early stopping);
  * score = cum_logprob / len(tokens) ** length_penalty, where tokens include the prompt and a
    final EOS is not counted (transformers divides by the generated length only).
With ignore_eos every final beam has the same length, the score orders beams by cum_logprob, and
the best beam equals transformers' generate(num_beams=beam_width, do_sample=False).
"""

from __future__ import annotations

import dataclasses

from jaxllm.sampling_params import BeamSearchParams, SamplingParams


@dataclasses.dataclass
class BeamSearchSequence:
    """One beam (vLLM's shape): tokens include the prompt; text decodes all of them."""

    tokens: list[int]
    cum_logprob: float = 0.0
    text: str | None = None
    finish_reason: str | None = None  # "stop" (EOS) or "length"


@dataclasses.dataclass
class BeamSearchOutput:
    """The best beams of one prompt, best first (at most beam_width)."""

    sequences: list[BeamSearchSequence]


def beam_search_score(tokens: list[int], cum_logprob: float, eos_token_ids, length_penalty: float) -> float:
    """vLLM's score: cum_logprob / seq_len ** length_penalty (a final EOS does not count)."""
    seq_len = len(tokens) - (1 if tokens and tokens[-1] in eos_token_ids else 0)
    return cum_logprob / (seq_len ** length_penalty)


def run_beam_search(llm, prompt_token_ids: list[list[int]], params: BeamSearchParams,
                    eos_token_ids: tuple[int, ...], max_model_len: int) -> list[BeamSearchOutput]:
    """Beam search for each prompt (token ids); see the module docstring."""
    step_params = SamplingParams(temperature=params.temperature, max_tokens=1, ignore_eos=True,
                                 logprobs=2 * params.beam_width, skip_special_tokens=False)

    def score(beam: BeamSearchSequence) -> float:
        return beam_search_score(beam.tokens, beam.cum_logprob, eos_token_ids, params.length_penalty)

    live = [[BeamSearchSequence(tokens=list(p))] for p in prompt_token_ids]
    completed: list[list[BeamSearchSequence]] = [[] for _ in prompt_token_ids]
    for _ in range(params.max_tokens):
        # Beams at max_model_len cannot grow: they are complete ("length").
        for beams, done in zip(live, completed):
            for beam in [b for b in beams if len(b.tokens) >= max_model_len]:
                beam.finish_reason = "length"
                done.append(beam)
                beams.remove(beam)
        flat = [beam for beams in live for beam in beams]
        if not flat:
            break
        outputs = llm.generate([{"prompt_token_ids": b.tokens} for b in flat], step_params, use_tqdm=False)
        errors = [o.error for o in outputs if o.error]
        if errors:
            raise RuntimeError(f"beam search step failed: {errors[0]}")
        results = iter(outputs)
        for k, beams in enumerate(live):
            candidates = []
            for beam in beams:
                for token, logprob in next(results).outputs[0].logprobs[0].items():
                    child = BeamSearchSequence(beam.tokens + [token], beam.cum_logprob + logprob.logprob)
                    if token in eos_token_ids and not params.ignore_eos:
                        child.finish_reason = "stop"
                        completed[k].append(child)
                    else:
                        candidates.append(child)
            live[k] = sorted(candidates, key=score, reverse=True)[: params.beam_width]

    tokenizer = llm.get_tokenizer()
    results = []
    for beams, done in zip(live, completed):
        for beam in beams:
            beam.finish_reason = beam.finish_reason or "length"
        best = sorted(done + beams, key=score, reverse=True)[: params.beam_width]
        for beam in best:
            beam.text = tokenizer.decode(beam.tokens) if tokenizer is not None else ""
        results.append(BeamSearchOutput(sequences=best))
    return results
