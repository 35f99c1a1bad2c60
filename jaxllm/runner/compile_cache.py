"""JAX's persistent compilation cache, in a jaxllm cache directory, and compile counters.

A fresh process that builds an engine for a model and settings it has seen before loads the
compiled step executables from disk instead of compiling them again (EngineConfig.compile_cache_dir;
None turns it off). JAX keys an entry by the lowered program, the compile options, the backend and
the jax version, so a changed model, shape or flag simply misses.

Two processes may share the directory: the cache is given a size limit, which makes JAX guard
every read and write with a file lock (jax/_src/lru_cache.py) and evict the least recently used
entries beyond the limit.

The cache is process-wide (a jax config): the first engine that enables it chooses the directory
for the process; an engine asking for another one later is warned and uses the first. An engine
with compile_cache_dir=None does not turn off a cache that something else enabled.

Counting: jax fires `/jax/core/compile/backend_compile_duration` around compile-or-load, i.e. for a
persistent-cache hit as well as for a real XLA compilation, and `/jax/compilation_cache/cache_hits`
for a hit only. So real compilations = backend events - cache hits.
"""

from __future__ import annotations

import logging
import os
import warnings

import jax

from jaxllm.config import DEFAULT_COMPILE_CACHE_DIR  # noqa: F401 - re-exported

logger = logging.getLogger(__name__)
# LRU limit of the directory; a limit (rather than none) is what makes JAX lock the cache files.
MAX_CACHE_BYTES = 4 << 30

_BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"
# Process-wide counters (jax's events are process-wide): executables built (compiled or loaded
# from the persistent cache) and persistent-cache hits among them.
NUM_BACKEND_COMPILES = [0]
NUM_CACHE_HITS = [0]
BACKEND_COMPILE_SECONDS = [0.0]  # total duration of those events (compiles and cache loads)


def _on_duration(event: str, duration_secs: float, **kwargs) -> None:
    if event == _BACKEND_COMPILE_EVENT:
        NUM_BACKEND_COMPILES[0] += 1
        BACKEND_COMPILE_SECONDS[0] += duration_secs


def _on_event(event: str, **kwargs) -> None:
    if event == _CACHE_HIT_EVENT:
        NUM_CACHE_HITS[0] += 1


jax.monitoring.register_event_duration_secs_listener(_on_duration)
jax.monitoring.register_event_listener(_on_event)


def enable(cache_dir: str | None) -> str | None:
    """Point JAX's persistent compilation cache at `cache_dir` (created if missing); returns the
    directory in use for this process (None: no cache). `cache_dir=None` leaves things as they are."""
    current = jax.config.jax_compilation_cache_dir
    if cache_dir is None:
        return current or None
    path = os.path.abspath(os.path.expanduser(cache_dir))
    if current:
        if os.path.abspath(os.path.expanduser(current)) != path:
            warnings.warn(f"the JAX compilation cache of this process is already {current!r}; "
                          f"compile_cache_dir={cache_dir!r} is ignored")
        return current
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    # Every step executable is worth keeping (the smallest still takes a second or more on a
    # busy CPU), and the per-bucket ones are what a second process needs.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_compilation_cache_max_size", MAX_CACHE_BYTES)
    logger.info("JAX persistent compilation cache: %s", path)
    return path
