"""The FastAPI app: routes, the API-key check, OpenAI-shaped errors, abort on disconnect.

    app = build_app(AsyncEngine(engine), served_model_names=["my-model"], api_key=None)
    uvicorn.run(app, host="127.0.0.1", port=8000)

Routes: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /health,
GET /metrics (Prometheus), GET /version. With an API key, every /v1 route needs
`Authorization: Bearer KEY` (401 otherwise); /health and /metrics stay open, as in vLLM.
Every error body is OpenAI's {"error": {"message", "type", "param", "code"}}; a request that
fails validation is a 400 naming the field (FastAPI's default would be 422).
"""

from __future__ import annotations

import asyncio
import hmac
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

import jaxllm
from jaxllm.async_engine import AsyncEngine
from jaxllm.entrypoints.openai.metrics import ServerMetrics
from jaxllm.entrypoints.openai.protocol import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList
from jaxllm.entrypoints.openai.serving import OpenAIError, ServingContext
from jaxllm.entrypoints.openai.serving_chat import create_chat_completion
from jaxllm.entrypoints.openai.serving_completion import create_completion

logger = logging.getLogger("jaxllm.server")


def build_app(engine: AsyncEngine, served_model_names: list[str], api_key: str | None = None,
              model_path: str | None = None) -> FastAPI:
    """The app over a started AsyncEngine. The first served name is the one responses carry."""
    if not served_model_names:
        raise ValueError("served_model_names must name at least one model")
    app = FastAPI(title="jaxllm OpenAI-compatible server", version=_version())
    ctx = ServingContext(engine, served_model_names[0], ServerMetrics(served_model_names[0]))
    app.state.ctx = ctx
    if api_key:
        app.add_middleware(APIKeyMiddleware, api_key=api_key)

    @app.exception_handler(OpenAIError)
    async def _openai_error(_, e: OpenAIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_, e: RequestValidationError):
        first = e.errors()[0]
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        if first.get("type") == "json_invalid":
            return _error(400, f"the body is not valid JSON: {first.get('msg')}", None)
        if not loc:
            return _error(400, "the body must be a JSON object, sent with 'Content-Type: application/json'", None)
        param = loc[0] if loc else None
        where = ".".join(loc) if loc else "body"
        return _error(400, f"{where}: {first.get('msg')} (got {first.get('input')!r})", param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_, e: StarletteHTTPException):
        return _error(e.status_code, str(e.detail), None, type="not_found_error" if e.status_code == 404 else None)

    @app.get("/health")
    async def health():
        if not engine.is_running:
            return _error(503, "the engine thread is not running", None, type="service_unavailable")
        return Response(status_code=200)

    @app.get("/version")
    async def version():
        return {"version": _version()}

    @app.get("/metrics")
    async def metrics():
        return Response(await ctx.metrics.render(engine), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        max_len = engine.engine.resolved.max_model_len
        return ModelList(data=[ModelCard(id=name, root=model_path or served_model_names[0], max_model_len=max_len)
                               for name in served_model_names])

    def check_model(name: str | None) -> None:
        if name is not None and name not in served_model_names:
            raise OpenAIError(404, f"The model `{name}` does not exist; this server serves {served_model_names}",
                              "model", code="model_not_found")

    async def respond(raw: Request, req, create):
        check_model(req.model)
        if req.model_extra:
            logger.warning("ignoring unknown request fields %s", sorted(req.model_extra))
        streams, work = await create(req, ctx)
        if req.stream:
            return EngineStreamingResponse(work, on_close=lambda: ctx.release(streams))
        # Not streaming: the handler waits for the whole result, so watch the connection meanwhile.
        task = asyncio.ensure_future(work)
        try:
            if not await _unless_disconnected(raw, task):
                return Response(status_code=499)  # nobody is listening; the requests were aborted
        finally:
            ctx.release(streams)
        return JSONResponse(task.result().model_dump())

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, raw: Request):
        return await respond(raw, req, create_completion)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, raw: Request):
        return await respond(raw, req, create_chat_completion)

    return app


class EngineStreamingResponse(StreamingResponse):
    """An SSE StreamingResponse that calls `on_close` however it ends: all sent, or the client
    gone (Starlette then cancels the sending task, perhaps before the generator ever ran)."""

    def __init__(self, content, on_close):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


async def _unless_disconnected(raw: Request, task: asyncio.Future) -> bool:
    """Wait for the task; False if the client disconnected first, and then the task is
    cancelled (its requests abort as their streams are left)."""
    async def disconnected():
        while (await raw.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if task not in done:
        task.cancel()
        return False
    return True


class APIKeyMiddleware:
    """Pure ASGI (a BaseHTTPMiddleware would buffer and disturb streaming responses)."""

    def __init__(self, app, api_key: str):
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1") and scope["method"] != "OPTIONS":
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                message = ("missing API key: send 'Authorization: Bearer <key>'" if not given
                           else "incorrect API key")
                response = _error(401, message, None, code="invalid_api_key")
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _error(status: int, message: str, param: str | None, type: str | None = None,
           code: str | None = None) -> JSONResponse:
    e = OpenAIError(status, message, param, type=type or "invalid_request_error", code=code)
    return JSONResponse(e.body(), status_code=status)


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("jaxllm")
    except Exception:  # noqa: BLE001 - running from a checkout that is not installed
        return getattr(jaxllm, "__version__", "unknown")
