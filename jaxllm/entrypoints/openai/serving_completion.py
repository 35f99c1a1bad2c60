"""POST /v1/completions: prompts (text, texts, token ids, lists of token ids) -> choices, streamed
as SSE chunks or whole. Choice index = prompt index * n + sample index, as OpenAI. Host only."""

from __future__ import annotations

import time
from collections import defaultdict
from typing import AsyncIterator

from jaxllm.async_engine import RequestStream
from jaxllm.entrypoints.openai.protocol import CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse
from jaxllm.entrypoints.openai.serving import (
    ServingContext,
    Usage,
    add_requests,
    bad_request,
    check_finished_ok,
    new_id,
    observed,
    sampling_params,
    sse,
    token_text,
)


def _prompts(prompt) -> list:
    """The request's prompts as Engine prompts: strings or {"prompt_token_ids": [...]}."""
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise bad_request("prompt is empty", "prompt")
    if all(isinstance(p, int) for p in prompt):
        return [{"prompt_token_ids": prompt}]
    return [p if isinstance(p, str) else {"prompt_token_ids": p} for p in prompt]


class _LogprobsBuilder:
    """The legacy completions logprobs of one choice, appended token by token; text_offset counts
    from the start of the choice's text (the echoed prompt included)."""

    def __init__(self, ctx: ServingContext):
        self.ctx = ctx
        self.offset = 0

    def build(self, token_ids: list[int], entries: list) -> CompletionLogprobs:
        out = CompletionLogprobs()
        for tid, entry in zip(token_ids, entries):
            if entry is None:  # the first prompt token has no logprob
                tok, lp, top = self.ctx.decode_token(tid), None, None
            else:
                tok = token_text(tid, entry[tid].decoded_token)
                lp = entry[tid].logprob
                top = {token_text(t, e.decoded_token): e.logprob for t, e in entry.items()}
            out.tokens.append(tok)
            out.token_logprobs.append(lp)
            out.top_logprobs.append(top)
            out.text_offset.append(self.offset)
            self.offset += len(tok)
        return out


async def create_completion(req: CompletionRequest, ctx: ServingContext):
    """(streams, work): with stream=True, work is an async iterator of SSE lines; otherwise a
    coroutine returning the CompletionResponse. Raises OpenAIError (400) before anything runs
    when the request is bad."""
    if req.suffix:
        raise bad_request("suffix is not supported", "suffix")
    if req.best_of is not None and req.best_of != req.n:
        raise bad_request(f"best_of={req.best_of} is not supported (only best_of == n)", "best_of")
    prompts = _prompts(req.prompt)
    params = sampling_params(
        req, max_tokens=req.max_tokens, logprobs=req.logprobs,
        prompt_logprobs=req.logprobs if req.echo and req.logprobs is not None else None,
        renamed={}, has_tokenizer=ctx.tokenizer is not None)
    streams = add_requests(ctx.engine, prompts, params, req, "prompt")
    echo_text = [_prompt_text(p, s, ctx) for p, s in zip(prompts, streams)] if req.echo else None
    if req.stream:
        return streams, _stream(req, ctx, streams, echo_text)
    return streams, _collect(req, ctx, streams, echo_text)


def _prompt_text(prompt, stream: RequestStream, ctx: ServingContext) -> str:
    if isinstance(prompt, str):
        return prompt
    return ctx.tokenizer.decode(stream.prompt_token_ids) if ctx.tokenizer is not None else ""


async def _collect(req: CompletionRequest, ctx: ServingContext, streams: list[RequestStream],
                   echo_text: list[str] | None) -> CompletionResponse:
    n, usage = req.n, Usage(len(streams))
    text, tokens, logprobs, finish, stop = defaultdict(str), defaultdict(list), defaultdict(list), {}, {}
    prompt_logprobs = {}
    async for i, delta in observed(streams, ctx.metrics):
        check_finished_ok(delta)
        usage.add(i, delta)
        if delta.prompt_logprobs is not None:
            prompt_logprobs[i] = delta.prompt_logprobs
        for c in delta.outputs:
            key = i * n + c.index
            text[key] += c.text
            tokens[key] += c.token_ids
            logprobs[key] += c.logprobs or []
            if c.finish_reason is not None:
                finish[key], stop[key] = c.finish_reason, c.stop_reason
    choices = []
    for key in range(len(streams) * n):
        i = key // n
        lp = None
        if req.logprobs is not None:
            builder = _LogprobsBuilder(ctx)  # its offset runs on from the echoed prompt
            head = builder.build(streams[i].prompt_token_ids, prompt_logprobs.get(i, [])) if echo_text is not None else None
            lp = _concat(head, builder.build(tokens[key], logprobs[key]))
        choices.append(CompletionChoice(
            index=key, text=(echo_text[i] if echo_text is not None else "") + text[key], logprobs=lp,
            finish_reason=finish.get(key), stop_reason=stop.get(key),
            token_ids=tokens[key] if req.return_token_ids else None,
            prompt_token_ids=streams[i].prompt_token_ids if req.return_token_ids else None,
        ))
    return CompletionResponse(id=new_id("cmpl"), model=ctx.model_name, choices=choices, usage=usage.info())


def _concat(head: CompletionLogprobs | None, tail: CompletionLogprobs) -> CompletionLogprobs:
    if head is None:
        return tail
    return CompletionLogprobs(
        text_offset=head.text_offset + tail.text_offset,
        token_logprobs=head.token_logprobs + tail.token_logprobs,
        tokens=head.tokens + tail.tokens,
        top_logprobs=head.top_logprobs + tail.top_logprobs,
    )


async def _stream(req: CompletionRequest, ctx: ServingContext, streams: list[RequestStream],
                  echo_text: list[str] | None) -> AsyncIterator[str]:
    n, usage, rid, created = req.n, Usage(len(streams)), new_id("cmpl"), int(time.time())
    builders: dict[int, _LogprobsBuilder] = {}
    started: set[int] = set()
    prompt_logprobs = {}

    def chunk(choices, usage_info=None) -> str:
        return sse(CompletionResponse(id=rid, created=created, model=ctx.model_name, choices=choices,
                                      usage=usage_info))

    async for i, delta in observed(streams, ctx.metrics):
        if delta.error is not None:
            yield sse({"error": {"message": delta.error, "type": "internal_server_error", "param": None,
                                 "code": None}})
            break
        usage.add(i, delta)
        if delta.prompt_logprobs is not None:
            prompt_logprobs[i] = delta.prompt_logprobs
        for c in delta.outputs:
            key = i * n + c.index
            text, lp = c.text, None
            builder = builders.setdefault(key, _LogprobsBuilder(ctx))
            first = key not in started
            started.add(key)
            if req.logprobs is not None:
                head = None
                if first and echo_text is not None:
                    head = builder.build(streams[i].prompt_token_ids, prompt_logprobs.get(i, []))
                lp = _concat(head, builder.build(c.token_ids, c.logprobs or []))
            if first and echo_text is not None:
                text = echo_text[i] + text
            yield chunk([CompletionChoice(
                index=key, text=text, logprobs=lp, finish_reason=c.finish_reason, stop_reason=c.stop_reason,
                token_ids=c.token_ids if req.return_token_ids else None,
                prompt_token_ids=streams[i].prompt_token_ids if req.return_token_ids and first else None,
            )])
    else:
        if req.stream_options is not None and req.stream_options.include_usage:
            yield chunk([], usage.info())
    yield sse("[DONE]")
