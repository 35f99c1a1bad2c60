"""What completions and chat share: errors, SamplingParams from a request, adding requests to the
AsyncEngine (validation errors become 400s naming the field), merging streams, SSE framing.
Host only."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import AsyncIterator

from jaxllm.async_engine import AsyncEngine, RequestDelta, RequestStream
from jaxllm.entrypoints.openai.metrics import ServerMetrics
from jaxllm.entrypoints.openai.protocol import ErrorInfo, ErrorResponse, SamplingFields, UsageInfo
from jaxllm.sampling_params import SamplingParams


class OpenAIError(Exception):
    """An error the app turns into OpenAI's JSON error body with this status."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 type: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code

    def body(self) -> dict:
        return ErrorResponse(error=ErrorInfo(message=self.message, type=self.type, param=self.param,
                                             code=self.code)).model_dump()


def bad_request(message: str, param: str | None = None) -> OpenAIError:
    return OpenAIError(400, message, param)


def sampling_params(req: SamplingFields, *, max_tokens: int | None, logprobs: int | None,
                    prompt_logprobs: int | None, renamed: dict[str, str], has_tokenizer: bool) -> SamplingParams:
    """The request's SamplingParams; a 400 naming the field for a bad value. `renamed` maps a
    SamplingParams field to the request field it came from (chat's top_logprobs -> logprobs)."""
    if req.logit_bias:
        raise bad_request("logit_bias is not supported", "logit_bias")
    if req.stop and not has_tokenizer:
        raise bad_request("stop strings need a tokenizer, and this model has none; use stop_token_ids", "stop")
    kwargs = dict(
        n=req.n,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=0 if req.top_k is None else req.top_k,
        min_p=0.0 if req.min_p is None else req.min_p,
        repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
        presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty,
        seed=req.seed,
        max_tokens=max_tokens,
        min_tokens=req.min_tokens,
        stop=req.stop,
        stop_token_ids=req.stop_token_ids,
        ignore_eos=req.ignore_eos,
        include_stop_str_in_output=req.include_stop_str_in_output,
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
        skip_special_tokens=req.skip_special_tokens,
    )
    try:
        return SamplingParams(**kwargs)
    except ValueError as e:
        # SamplingParams' messages start with the field's name ("top_k must be ...").
        name = str(e).split(" ", 1)[0]
        field = renamed.get(name, name)
        message = str(e) if field == name else f"{field}: {e}"
        raise bad_request(message, field if field in type(req).model_fields else None) from None


def add_requests(engine: AsyncEngine, prompts: list, params: SamplingParams, req: SamplingFields,
                 param_name: str) -> list[RequestStream]:
    """Add one request per prompt; a refused prompt is a 400 naming `param_name` (and the prompts
    added before it are aborted, so the call adds all or nothing)."""
    streams: list[RequestStream] = []
    try:
        for i, prompt in enumerate(prompts):
            try:
                streams.append(engine.add_request(prompt, params, priority=req.priority, cache_salt=req.cache_salt))
            except ValueError as e:
                where = f"{param_name}[{i}]" if len(prompts) > 1 else param_name
                raise bad_request(f"{where}: {e}", param_name) from None
    except BaseException:
        for stream in streams:
            engine.abort(stream.request_id)
        raise
    return streams


async def merge(streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestDelta]]:
    """(prompt index, delta) from several streams as they come. Leaving early aborts them all."""
    if len(streams) == 1:
        async for delta in streams[0]:
            yield 0, delta
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, stream: RequestStream) -> None:
        async for delta in stream:
            queue.put_nowait((i, delta))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            i, delta = await queue.get()
            remaining -= delta.finished
            yield i, delta
    finally:
        for task in tasks:
            task.cancel()  # a cancelled pump leaves its stream, which aborts the request


class Usage:
    """Token counts of one API call (several prompts, n samples each)."""

    def __init__(self, num_prompts: int):
        self.prompt = [0] * num_prompts
        self.cached = [0] * num_prompts
        self.completion = 0

    def add(self, prompt_index: int, delta: RequestDelta) -> None:
        if delta.prompt_token_ids:
            self.prompt[prompt_index] = len(delta.prompt_token_ids)
        self.cached[prompt_index] = max(self.cached[prompt_index], delta.num_cached_tokens)
        self.completion += sum(len(c.token_ids) for c in delta.outputs)

    def info(self) -> UsageInfo:
        prompt = sum(self.prompt)
        return UsageInfo(prompt_tokens=prompt, completion_tokens=self.completion,
                         total_tokens=prompt + self.completion,
                         prompt_tokens_details={"cached_tokens": sum(self.cached)})


async def observed(streams: list[RequestStream], metrics: ServerMetrics) -> AsyncIterator[tuple[int, RequestDelta]]:
    """merge(), with each delta recorded in the server's metrics; an error delta raises."""
    async for i, delta in merge(streams):
        metrics.observe(streams[i], delta)
        yield i, delta


def check_finished_ok(delta: RequestDelta) -> None:
    if delta.error is not None:
        raise OpenAIError(500, delta.error, type="internal_server_error")


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def sse(payload) -> str:
    """One Server-Sent Event: a pydantic model, a dict, or the literal [DONE]."""
    if isinstance(payload, str):
        return f"data: {payload}\n\n"
    if isinstance(payload, dict):
        return f"data: {json.dumps(payload)}\n\n"
    return f"data: {payload.model_dump_json()}\n\n"


def token_text(entry_token: int, decoded: str | None) -> str:
    """A token's text in logprobs; without a tokenizer, "token_id:N" (vLLM's spelling)."""
    return decoded if decoded is not None else f"token_id:{entry_token}"


class ServingContext:
    """What a handler needs: the engine, the model's name in responses, the metrics."""

    def __init__(self, engine: AsyncEngine, model_name: str, metrics: ServerMetrics):
        self.engine = engine
        self.model_name = model_name
        self.metrics = metrics
        self.tokenizer = engine.tokenizer

    def decode_token(self, token_id: int) -> str:
        if self.tokenizer is None:
            return token_text(token_id, None)
        return self.tokenizer.decode([token_id])

    def release(self, streams: list[RequestStream]) -> None:
        """After a response ends, however it ends: abort what is unfinished (a client that went
        away), which frees its blocks, and count it in the metrics."""
        now = time.monotonic()
        for stream in streams:
            if not stream.finished:
                self.engine.abort(stream.request_id)
                self.metrics.observe_abandoned(stream, now)
            else:
                self.metrics.forget(stream)
