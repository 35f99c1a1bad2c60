"""AsyncEngine: the Engine behind an asyncio front end (the OpenAI server), as vLLM's AsyncLLM.

    async_engine = AsyncEngine(engine)                  # starts the engine thread
    stream = async_engine.add_request(prompt, params)   # validates now: ValueError naming the problem
    async for delta in stream:                          # RequestDelta: new text / tokens / logprobs
        ...
    async_engine.shutdown()

One thread owns the Engine: nothing else calls its methods (tokenizer and static config reads
excepted). It steps while any request is in flight and waits on a condition when idle. Requests,
aborts and calls arrive through one lock-protected inbox the thread drains between steps. Each
request's deltas go to its own asyncio.Queue, delivered with `loop.call_soon_threadsafe` once per
step for all requests of that loop; the queue is unbounded, so a slow client never blocks the
engine (what piles up for it is bounded by its max_tokens). A step that raises, or a request the
engine refuses, ends the affected requests with an error delta; the thread keeps running.

Host only: never imports jax (the Engine it is given does).
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import threading
import time
import uuid
from collections import defaultdict
from typing import Any, AsyncIterator, Callable

from jaxllm.inputs import parse_cache_salt
from jaxllm.request import RequestMetrics, RequestOutput
from jaxllm.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class CompletionDelta:
    """What one completion (sample) gained since its previous delta."""

    index: int  # the sample's index, 0..n-1
    text: str  # new text (held back while it may still become a stop string or an unfinished character)
    token_ids: list[int]  # new token ids
    logprobs: list | None  # new {token_id: Logprob} entries, one per new token (when requested)
    finish_reason: str | None  # "stop" | "length" | "abort" | "error" on the sample's last delta
    stop_reason: int | str | None = None
    num_output_tokens: int = 0  # the sample's output tokens so far (cumulative)


@dataclasses.dataclass
class RequestDelta:
    """One step's news for one request. A request's last delta has finished=True."""

    request_id: str
    outputs: list[CompletionDelta]  # only the samples that changed
    finished: bool
    time: float  # time.monotonic() when the engine produced it (the engine's clock)
    prompt_token_ids: list[int]
    metrics: RequestMetrics | None = None  # live: the engine updates it until the request ends
    error: str | None = None
    prompt_logprobs: list | None = None  # on one delta only, the first that has them (complete by then)
    num_cached_tokens: int = 0


class RequestStream:
    """The deltas of one request, read on the event loop that added it.

    Iterating to the end yields every delta once, the last with finished=True. Leaving the
    iteration early (a break, an exception, a cancelled task: a client that went away) aborts the
    request, which frees its KV blocks.
    """

    def __init__(self, request_id: str, engine: "AsyncEngine", loop: asyncio.AbstractEventLoop,
                 prompt_token_ids: list[int], params: SamplingParams, arrival_time: float):
        self.request_id = request_id
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self.arrival_time = arrival_time  # time.monotonic(), the engine's clock
        self.loop = loop
        self.finished = False
        self._engine = engine
        self._queue: asyncio.Queue[RequestDelta] = asyncio.Queue()

    def __aiter__(self) -> AsyncIterator[RequestDelta]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[RequestDelta]:
        try:
            while not self.finished:
                delta = await self._queue.get()
                self.finished = delta.finished
                yield delta
        finally:
            if not self.finished:
                self._engine.abort(self.request_id)

    def _put(self, delta: RequestDelta) -> None:  # on self.loop
        self._queue.put_nowait(delta)


class DeltaTracker:
    """Turns a request's cumulative RequestOutputs into RequestDeltas (in the engine thread).

    Text is held back while its end could still change: a trailing U+FFFD (a byte-level token
    that splits a UTF-8 character decodes to it until the rest arrives), or a suffix that is the
    start of a stop string (the detokenizer cuts the text before a stop string once it is complete,
    so text streamed before that would have to be taken back). A finished sample sends the rest.
    """

    def __init__(self, request_id: str, params: SamplingParams):
        self.request_id = request_id
        self.stop = list(params.stop or [])
        self.wants_logprobs = params.logprobs is not None
        self._text: dict[int, str] = defaultdict(str)  # index -> text sent
        self._tokens: dict[int, int] = defaultdict(int)  # index -> tokens sent
        self._finished: set[int] = set()
        self._first = True
        self._sent_prompt_logprobs = False

    def update(self, out: RequestOutput, now: float) -> RequestDelta | None:
        deltas = []
        for c in out.outputs:
            if c.index in self._finished:
                continue
            done = c.finish_reason is not None
            text = c.text if done else self._safe_text(c.text)
            sent = self._text[c.index]
            new_text = text[len(sent):] if text.startswith(sent) else ""
            if not text.startswith(sent):  # cannot happen with the hold-back above; never resend
                logger.warning("request %s: text changed after it was streamed", self.request_id)
            else:
                self._text[c.index] = text
            start = self._tokens[c.index]
            new_ids = c.token_ids[start:]
            self._tokens[c.index] = len(c.token_ids)
            if not (new_text or new_ids or done):
                continue
            if done:
                self._finished.add(c.index)
            deltas.append(CompletionDelta(
                index=c.index, text=new_text, token_ids=list(new_ids),
                logprobs=list(c.logprobs[start:]) if self.wants_logprobs and c.logprobs is not None else None,
                finish_reason=c.finish_reason, stop_reason=c.stop_reason,
                num_output_tokens=len(c.token_ids),
            ))
        if not deltas and not out.finished:
            return None
        first, self._first = self._first, False
        # With n > 1 only sample 0 computes prompt logprobs: they come with its first report.
        prompt_logprobs = out.prompt_logprobs if not self._sent_prompt_logprobs else None
        self._sent_prompt_logprobs |= prompt_logprobs is not None
        return RequestDelta(
            request_id=self.request_id, outputs=deltas, finished=out.finished, time=now,
            prompt_token_ids=out.prompt_token_ids if first else [],
            metrics=out.metrics, error=out.error, prompt_logprobs=prompt_logprobs,
            num_cached_tokens=out.num_cached_tokens,
        )

    def _safe_text(self, text: str) -> str:
        text = text.rstrip("\ufffd")
        for cut in range(min(len(text), max((len(s) for s in self.stop), default=1) - 1), 0, -1):
            if any(s.startswith(text[-cut:]) for s in self.stop):
                return text[:-cut]
        return text

    def final(self, n: int, reason: str, error: str | None, now: float) -> RequestDelta:
        """The last delta of a request the engine will say nothing more about (abort, error)."""
        outputs = [CompletionDelta(index=i, text="", token_ids=[], logprobs=[] if self.wants_logprobs else None,
                                   finish_reason=reason, num_output_tokens=self._tokens[i])
                   for i in range(n) if i not in self._finished]
        return RequestDelta(request_id=self.request_id, outputs=outputs, finished=True, time=now,
                            prompt_token_ids=[], error=error)


@dataclasses.dataclass
class _Live:
    """A request in flight, as the engine thread sees it."""

    stream: RequestStream
    tracker: DeltaTracker
    n: int


class AsyncEngine:
    """Runs `engine` in its own thread; see the module docstring."""

    def __init__(self, engine, start: bool = True):
        self.engine = engine
        self._cond = threading.Condition()
        self._inbox: list[tuple] = []  # commands for the engine thread, under _cond
        self._ids_in_use: set[str] = set()  # under _cond: ids added and not yet finished
        self._live: dict[str, _Live] = {}  # engine thread only
        self._stopping = False
        self._prefix = uuid.uuid4().hex[:8]
        self._ids = itertools.count()
        self.num_loop_errors = 0  # steps that raised out of Engine.step (their requests ended with an error)
        self._thread = threading.Thread(target=self._run, name="jaxllm-engine", daemon=True)
        if start:
            self._thread.start()

    # ---------------------------------------------------------------- the caller's side

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def is_running(self) -> bool:
        return self._thread.is_alive() and not self._stopping

    def add_request(self, prompt, params: SamplingParams, request_id: str | None = None,
                    priority: int = 0, cache_salt: str | None = None,
                    arrival_time: float | None = None) -> RequestStream:
        """Queue a request; call on the event loop that will read the returned stream.

        Validates now, in the caller's thread, with the engine's own checks: a ValueError naming
        the problem (a prompt longer than max_model_len, a token outside the vocabulary, ...)
        means nothing was queued. `prompt` as for Engine.add_request."""
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be a SamplingParams, got {type(params).__name__}")
        text, token_ids = self.engine.check_prompt(prompt, params)
        cache_salt = parse_cache_salt(prompt, cache_salt)
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise ValueError(f"priority must be an int, got {priority!r}")
        request_id = request_id if request_id is not None else f"{self._prefix}-{next(self._ids)}"
        arrival_time = time.monotonic() if arrival_time is None else arrival_time
        stream = RequestStream(request_id, self, asyncio.get_running_loop(), token_ids, params, arrival_time)
        tokenized = {"prompt": text, "prompt_token_ids": token_ids}  # the engine thread won't tokenize again
        with self._cond:
            if self._stopping:
                raise RuntimeError("the engine is shut down")
            if request_id in self._ids_in_use:
                raise ValueError(f"request_id {request_id!r} is already in use")
            self._ids_in_use.add(request_id)
            self._inbox.append(("add", stream, tokenized, params, priority, cache_salt, arrival_time))
            self._cond.notify()
        return stream

    def abort(self, request_id: str) -> None:
        """Abort a request (its stream ends with finish_reason "abort"); unknown ids are ignored.
        Thread-safe; returns at once."""
        self._post(("abort", str(request_id)))

    async def call(self, fn: Callable[[Any], Any]) -> Any:
        """`fn(engine)` run in the engine thread between steps (e.g. Engine.get_stats)."""
        if not self.is_running:
            raise RuntimeError("the engine thread is not running")
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._post(("call", fn, future, loop))
        return await future

    async def get_stats(self) -> dict:
        """Engine.get_stats(), taken between two steps."""
        return await self.call(lambda engine: engine.get_stats())

    def shutdown(self, timeout: float = 10.0) -> None:
        """Abort what is in flight (each stream ends with "abort") and stop the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def _post(self, command: tuple) -> None:
        with self._cond:
            self._inbox.append(command)
            self._cond.notify()

    # ---------------------------------------------------------------- the engine thread

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._inbox and not self._stopping and not self.engine.has_unfinished_requests():
                    self._cond.wait()
                commands, self._inbox = self._inbox, []
                stopping = self._stopping
            for command in commands:
                try:
                    self._handle(command)
                except Exception:  # noqa: BLE001 - the loop outlives any one command
                    logger.exception("engine thread: command %s failed", command[0])
            if stopping:
                for request_id in list(self._live):
                    self._abort(request_id, "abort", None)
                return
            if self.engine.has_unfinished_requests():
                self._step()

    def _handle(self, command: tuple) -> None:
        kind = command[0]
        if kind == "add":
            _, stream, prompt, params, priority, cache_salt, arrival_time = command
            self._live[stream.request_id] = _Live(stream, DeltaTracker(stream.request_id, params), params.n)
            try:
                self.engine.add_request(stream.request_id, prompt, params, arrival_time=arrival_time,
                                        priority=priority, cache_salt=cache_salt)
            except Exception as e:  # noqa: BLE001 - validated already; a refusal here ends only this request
                logger.warning("request %s refused by the engine: %s", stream.request_id, e)
                self._end(stream.request_id, "error", f"{type(e).__name__}: {e}")
        elif kind == "abort":
            self._abort(command[1], "abort", None)
        elif kind == "call":
            _, fn, future, loop = command
            try:
                result, error = fn(self.engine), None
            except Exception as e:  # noqa: BLE001 - handed to the caller
                result, error = None, e
            _call_soon(loop, _resolve, future, result, error)

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as e:  # noqa: BLE001 - Engine.step contains device failures; this is a bug elsewhere
            self.num_loop_errors += 1
            logger.exception("engine step raised; ending the %d requests in flight", len(self._live))
            for request_id in list(self._live):
                self._abort(request_id, "error", f"engine step failed: {type(e).__name__}: {e}")
            return
        now = time.monotonic()
        by_loop: dict[asyncio.AbstractEventLoop, list] = defaultdict(list)
        for out in outputs:
            live = self._live.get(out.request_id)
            if live is None:
                continue
            delta = live.tracker.update(out, now)
            if delta is not None:
                by_loop[live.stream.loop].append((live.stream, delta))
            if out.finished:
                self._forget(out.request_id)
        for loop, items in by_loop.items():
            if not _call_soon(loop, _deliver, items):
                for stream, _ in items:  # its event loop is gone: nobody will read these
                    self.engine.abort_request(stream.request_id)
                    self._forget(stream.request_id)

    def _abort(self, request_id: str, reason: str, error: str | None) -> None:
        """Abort in the engine (freeing its blocks) and end the stream with `reason`."""
        if request_id not in self._live:
            return
        try:
            self.engine.abort_request(request_id)
        except Exception:  # noqa: BLE001 - the stream must end whatever the engine says
            logger.exception("abort of %s failed", request_id)
        self._end(request_id, reason, error)

    def _end(self, request_id: str, reason: str, error: str | None) -> None:
        live = self._live.get(request_id)
        if live is None:
            return
        self._forget(request_id)
        delta = live.tracker.final(live.n, reason, error, time.monotonic())
        _call_soon(live.stream.loop, _deliver, [(live.stream, delta)])

    def _forget(self, request_id: str) -> None:
        self._live.pop(request_id, None)
        with self._cond:
            self._ids_in_use.discard(request_id)


def _deliver(items) -> None:  # on the streams' event loop
    for stream, delta in items:
        stream._put(delta)


def _resolve(future: asyncio.Future, result, error) -> None:
    if future.done():  # the caller gave up waiting
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def _call_soon(loop: asyncio.AbstractEventLoop, fn, *args) -> bool:
    try:
        loop.call_soon_threadsafe(fn, *args)
        return True
    except RuntimeError:  # the loop is closed
        return False
