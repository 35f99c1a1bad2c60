"""Prometheus metrics of the server, named like vLLM's (`vllm:x` -> `jaxllm:x`).

Per-request metrics are observed from the request's deltas as the serving code reads them
(nothing patches the engine): TTFT at the first token, inter-token latency between a sample's
consecutive tokens, end-to-end latency and finish reasons at the end. Engine-wide ones (running /
waiting requests, KV-cache usage, prefix-cache queries and hits, preemptions) come from
Engine.get_stats(), taken by the engine thread when /metrics is scraped, so they are current.

Times are the engine's clock (time.monotonic) at the step that produced a token.
A per-app CollectorRegistry, so several apps can live in one process (tests).
"""

from __future__ import annotations

import asyncio

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from jaxllm.async_engine import RequestDelta, RequestStream

# vLLM's buckets (seconds / tokens).
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
               20.0, 40.0, 80.0)
LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                   120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000)


class ServerMetrics:
    def __init__(self, model_name: str):
        self.model_name = model_name
        self.registry = CollectorRegistry()
        reg, label = self.registry, ["model_name"]
        self.request_success = Counter(
            "jaxllm:request_success", "Finished samples by finish reason (stop, length, abort, error).",
            label + ["finished_reason"], registry=reg)
        self.prompt_tokens = Counter("jaxllm:prompt_tokens", "Prompt tokens of finished requests.", label, registry=reg)
        self.generation_tokens = Counter("jaxllm:generation_tokens", "Generated tokens.", label, registry=reg)
        self.ttft = Histogram("jaxllm:time_to_first_token_seconds", "Arrival to first token.", label,
                              buckets=TTFT_BUCKETS, registry=reg)
        self.itl = Histogram("jaxllm:inter_token_latency_seconds", "Between a sample's consecutive tokens.",
                             label, buckets=ITL_BUCKETS, registry=reg)
        self.e2e = Histogram("jaxllm:e2e_request_latency_seconds", "Arrival to the last sample's end.",
                             label, buckets=LATENCY_BUCKETS, registry=reg)
        self.queue_time = Histogram("jaxllm:request_queue_time_seconds", "Arrival to first scheduling.",
                                    label, buckets=LATENCY_BUCKETS, registry=reg)
        self.request_prompt_tokens = Histogram("jaxllm:request_prompt_tokens", "Prompt length per request.",
                                               label, buckets=TOKEN_BUCKETS, registry=reg)
        self.request_generation_tokens = Histogram(
            "jaxllm:request_generation_tokens", "Generated tokens per request (all its samples).",
            label, buckets=TOKEN_BUCKETS, registry=reg)
        self._stats: dict | None = None
        self._tracks: dict[str, _Track] = {}  # request id -> what its deltas showed so far
        self.registry.register(_EngineCollector(self))

    def observe(self, stream: RequestStream, delta: RequestDelta) -> None:
        """Record one delta of `stream` (the serving code calls this for every delta it reads)."""
        name = self.model_name
        track = self._tracks.setdefault(stream.request_id, _Track())
        new = 0
        for c in delta.outputs:
            if c.token_ids:
                last = track.last_token_time.get(c.index)
                if track.generated == 0 and new == 0:
                    self.ttft.labels(name).observe(delta.time - stream.arrival_time)
                elif last is not None:
                    self.itl.labels(name).observe((delta.time - last) / len(c.token_ids))
                track.last_token_time[c.index] = delta.time
                new += len(c.token_ids)
            if c.finish_reason is not None:
                self.request_success.labels(name, c.finish_reason).inc()
                track.finished += 1
        if new:
            self.generation_tokens.labels(name).inc(new)
            track.generated += new
        if delta.finished:
            self._end(stream, delta.time)
            m = delta.metrics
            if m is not None and m.queue_time is not None:
                self.queue_time.labels(name).observe(m.queue_time)

    def observe_abandoned(self, stream: RequestStream, now: float) -> None:
        """A stream its reader left before the end (a client that went away): the request was
        aborted and its last delta will not be read, so its unfinished samples count as aborted."""
        track = self._tracks.get(stream.request_id, _Track())
        self.request_success.labels(self.model_name, "abort").inc(stream.params.n - track.finished)
        self._end(stream, now)

    def forget(self, stream: RequestStream) -> None:
        """Drop what is kept for a finished stream (normally gone already with its last delta)."""
        self._tracks.pop(stream.request_id, None)

    def _end(self, stream: RequestStream, now: float) -> None:
        name, track = self.model_name, self._tracks.pop(stream.request_id, _Track())
        self.prompt_tokens.labels(name).inc(len(stream.prompt_token_ids))
        self.request_prompt_tokens.labels(name).observe(len(stream.prompt_token_ids))
        self.request_generation_tokens.labels(name).observe(track.generated)
        self.e2e.labels(name).observe(now - stream.arrival_time)

    async def render(self, engine, timeout: float = 5.0) -> bytes:
        """The text exposition, with the engine's counters taken now (in the engine thread,
        between two steps). A step that outlasts `timeout` (a compilation) leaves the previous
        snapshot in place rather than holding up the scrape."""
        try:
            self._stats = await asyncio.wait_for(asyncio.shield(engine.get_stats()), timeout)
        except (asyncio.TimeoutError, RuntimeError):  # a long step; the engine thread is gone
            pass
        return generate_latest(self.registry)


class _Track:
    def __init__(self):
        self.generated = 0  # tokens of all samples so far
        self.finished = 0  # samples finished
        self.last_token_time: dict[int, float] = {}  # sample index -> time of its last token


class _EngineCollector:
    """Gauges and counters read from the latest Engine.get_stats() snapshot."""

    def __init__(self, metrics: ServerMetrics):
        self.metrics = metrics

    def collect(self):
        stats, name = self.metrics._stats, self.metrics.model_name
        if stats is None:
            return

        def gauge(metric, doc, value):
            g = GaugeMetricFamily(metric, doc, labels=["model_name"])
            g.add_metric([name], value)
            return g

        def counter(metric, doc, value):
            c = CounterMetricFamily(metric, doc, labels=["model_name"])
            c.add_metric([name], value)
            return c

        total = stats["num_kv_blocks"]
        yield gauge("jaxllm:num_requests_running", "Requests in the running set.", stats["num_running"])
        yield gauge("jaxllm:num_requests_waiting", "Requests waiting (new, preempted or swapped).",
                    stats["num_waiting"])
        yield gauge("jaxllm:kv_cache_usage_perc", "Fraction of KV blocks held by requests (0..1).",
                    stats["kv_blocks_used"] / total if total else 0.0)
        yield gauge("jaxllm:kv_cache_blocks_used", "KV blocks held by requests.", stats["kv_blocks_used"])
        yield gauge("jaxllm:kv_cache_blocks_total", "Usable KV blocks.", total)
        yield gauge("jaxllm:cpu_cache_blocks_used", "Host swap-pool blocks in use.", stats["cpu_blocks_used"])
        yield gauge("jaxllm:prefix_cache_hit_rate", "Prefix-cache hits / queries (tokens), since start.",
                    stats["prefix_cache_hit_rate"])
        yield counter("jaxllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                      stats["prefix_cache_queries"])
        yield counter("jaxllm:prefix_cache_hits", "Prompt tokens found in the prefix cache.",
                      stats["prefix_cache_hits"])
        yield counter("jaxllm:num_preemptions", "Preemptions (recompute or swap).", stats["num_preemptions"])
        yield counter("jaxllm:num_swap_outs", "Requests swapped out to the host pool.", stats["num_swap_outs"])
        yield counter("jaxllm:num_failed_steps", "Engine steps that failed (their requests ended with an error).",
                      stats["num_failed_steps"])
        yield counter("jaxllm:num_compilations", "Step compilations (none expected after warm-up).",
                      stats["num_compilations"])
