"""Arrival processes: when each request of a workload reaches the system (seconds after the
run starts; host only, never imports jax).

  offline   every request at 0 (request_rate = inf): offline throughput
  poisson   exponential gaps with mean 1 / rate
  gamma     gamma gaps with shape = burstiness and mean 1 / rate, as `vllm bench serve
            --burstiness`: burstiness 1 is Poisson, < 1 burstier, > 1 more regular
  replay    a trace's timestamps, shifted so the first is 0
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def arrival_times(num_requests: int, request_rate: float = math.inf, burstiness: float = 1.0,
                  seed: int = 0) -> np.ndarray:
    """[num_requests] float64 seconds, non-decreasing, the first request at 0 (vLLM's client
    sleeps one gap *after* each request, so its first also goes out at once)."""
    if not request_rate > 0:  # also catches NaN
        raise ValueError(f"request_rate must be > 0 requests/s (inf: all at once), got {request_rate!r}")
    if not (math.isfinite(burstiness) and burstiness > 0):
        raise ValueError(f"burstiness must be a finite number > 0, got {burstiness!r}")
    if math.isinf(request_rate):
        return np.zeros(num_requests)
    rng = np.random.default_rng(seed)
    # Gamma(shape k, scale theta) has mean k * theta: theta = 1 / (rate * k) keeps the rate.
    gaps = rng.gamma(burstiness, 1.0 / (request_rate * burstiness), size=max(num_requests - 1, 0))
    return np.concatenate([[0.0], np.cumsum(gaps)])[:num_requests]


def replay(timestamps: Sequence[float | None]) -> np.ndarray:
    """A trace's timestamps as arrival offsets (first at 0); a missing one is a ValueError."""
    missing = [i for i, t in enumerate(timestamps) if t is None]
    if missing:
        raise ValueError(f"replay_timestamps: requests {missing[:5]} have no timestamp in the dataset")
    t = np.asarray(timestamps, np.float64)
    if len(t) and np.any(np.diff(t) < 0):
        i = int(np.argmax(np.diff(t) < 0)) + 1
        raise ValueError(f"replay_timestamps: timestamps must not decrease (request {i}: {t[i]} < {t[i - 1]})")
    return t - t[0] if len(t) else t


def for_workload(cfg, workload) -> np.ndarray:
    """Arrival offsets for a Workload under a WorkloadConfig's arrival settings."""
    if cfg.replay_timestamps:
        return replay([r.timestamp for r in workload.requests])
    return arrival_times(workload.num_requests, cfg.request_rate, cfg.burstiness, cfg.seed)
