"""POST /v1/chat/completions: messages through the model's chat template -> assistant messages,
streamed as SSE chunks (role first, then content deltas) or whole. Host only."""

from __future__ import annotations

import time
from collections import defaultdict
from typing import AsyncIterator

from jaxllm.async_engine import RequestStream
from jaxllm.entrypoints.openai.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChoiceLogprobs,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprob,
    ChatStreamChoice,
    ChatTopLogprob,
    DeltaMessage,
)
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
from jaxllm.inputs import chat_prompt


def _conversation(req: ChatCompletionRequest) -> list[dict]:
    if not req.messages:
        raise bad_request("messages is empty", "messages")
    conv = []
    for i, m in enumerate(req.messages):
        content = m.content
        if isinstance(content, list):
            if any(p.type != "text" or p.text is None for p in content):
                raise bad_request(f"messages[{i}].content: only text parts are supported", "messages")
            content = "\n".join(p.text for p in content)
        msg = {"role": m.role, "content": content if content is not None else ""}
        if m.name is not None:
            msg["name"] = m.name
        conv.append(msg)
    return conv


def _logprobs(entries: list, token_ids: list[int], k: int) -> list[ChatLogprob]:
    out = []
    for tid, entry in zip(token_ids, entries):
        chosen = entry[tid]
        tok = token_text(tid, chosen.decoded_token)
        top = sorted(((e.rank, t, e) for t, e in entry.items() if e.rank is not None), key=lambda r: r[0])[:k]
        out.append(ChatLogprob(
            token=tok, logprob=chosen.logprob, bytes=list(tok.encode("utf-8")),
            top_logprobs=[ChatTopLogprob(token=(s := token_text(t, e.decoded_token)), logprob=e.logprob,
                                         bytes=list(s.encode("utf-8"))) for _, t, e in top],
        ))
    return out


async def create_chat_completion(req: ChatCompletionRequest, ctx: ServingContext):
    """(streams, work) as serving_completion.create_completion."""
    if req.tools:
        raise bad_request("tools are not supported", "tools")
    if req.response_format is not None and req.response_format.get("type") != "text":
        raise bad_request("only response_format {'type': 'text'} is supported", "response_format")
    if req.top_logprobs is not None and not req.logprobs:
        raise bad_request("top_logprobs needs logprobs=true", "top_logprobs")
    max_tokens_field = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    params = sampling_params(
        req, max_tokens=req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens,
        logprobs=(req.top_logprobs or 0) if req.logprobs else None, prompt_logprobs=None,
        renamed={"max_tokens": max_tokens_field, "logprobs": "top_logprobs"},
        has_tokenizer=ctx.tokenizer is not None)
    try:
        prompt = chat_prompt(ctx.tokenizer, _conversation(req), req.add_generation_prompt,
                             **(req.chat_template_kwargs or {}))
    except ValueError as e:
        raise bad_request(str(e), "messages") from None
    except Exception as e:  # noqa: BLE001 - a template error (jinja) is the request's fault
        raise bad_request(f"the chat template failed on these messages: {type(e).__name__}: {e}",
                          "messages") from None
    streams = add_requests(ctx.engine, [prompt], params, req, "messages")
    if req.stream:
        return streams, _stream(req, ctx, streams)
    return streams, _collect(req, ctx, streams)


async def _collect(req: ChatCompletionRequest, ctx: ServingContext, streams: list[RequestStream]):
    usage = Usage(1)
    text, tokens, entries, finish, stop = defaultdict(str), defaultdict(list), defaultdict(list), {}, {}
    async for _, delta in observed(streams, ctx.metrics):
        check_finished_ok(delta)
        usage.add(0, delta)
        for c in delta.outputs:
            text[c.index] += c.text
            tokens[c.index] += c.token_ids
            entries[c.index] += c.logprobs or []
            if c.finish_reason is not None:
                finish[c.index], stop[c.index] = c.finish_reason, c.stop_reason
    k = req.top_logprobs or 0
    choices = [ChatChoice(
        index=i, message=AssistantMessage(content=text[i]),
        logprobs=ChatChoiceLogprobs(content=_logprobs(entries[i], tokens[i], k)) if req.logprobs else None,
        finish_reason=finish.get(i), stop_reason=stop.get(i),
        token_ids=tokens[i] if req.return_token_ids else None,
    ) for i in range(req.n)]
    return ChatCompletionResponse(
        id=new_id("chatcmpl"), model=ctx.model_name, choices=choices, usage=usage.info(),
        prompt_token_ids=streams[0].prompt_token_ids if req.return_token_ids else None)


async def _stream(req: ChatCompletionRequest, ctx: ServingContext, streams: list[RequestStream]) -> AsyncIterator[str]:
    usage, rid, created, k = Usage(1), new_id("chatcmpl"), int(time.time()), req.top_logprobs or 0

    def chunk(choices, usage_info=None) -> str:
        return sse(ChatCompletionChunk(id=rid, created=created, model=ctx.model_name, choices=choices,
                                       usage=usage_info))

    for i in range(req.n):  # the role first, as OpenAI
        yield chunk([ChatStreamChoice(index=i, delta=DeltaMessage(role="assistant", content=""))])
    async for _, delta in observed(streams, ctx.metrics):
        if delta.error is not None:
            yield sse({"error": {"message": delta.error, "type": "internal_server_error", "param": None,
                                 "code": None}})
            break
        usage.add(0, delta)
        for c in delta.outputs:
            lp = ChatChoiceLogprobs(content=_logprobs(c.logprobs or [], c.token_ids, k)) if req.logprobs else None
            yield chunk([ChatStreamChoice(
                index=c.index, delta=DeltaMessage(content=c.text), logprobs=lp,
                finish_reason=c.finish_reason, stop_reason=c.stop_reason,
                token_ids=c.token_ids if req.return_token_ids else None,
            )])
    else:
        if req.stream_options is not None and req.stream_options.include_usage:
            yield chunk([], usage.info())
    yield sse("[DONE]")
