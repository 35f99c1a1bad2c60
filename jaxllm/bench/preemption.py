"""What preempting one request costs, both ways, on an engine after its timed run (the
PagedAttention paper's Fig. 19: swap's cost grows as blocks get small, recompute's does not).

    cost = preemption_cost(llm.engine, victim_tokens=256, reps=5, vocab_size=32000)
    cost["recompute_ms"], cost["swap_ms"], cost["swap_over_recompute"]

recompute_ms: the step that computes a victim's `victim_tokens` tokens again, i.e. one prefill
  step of that many tokens, sent through the public API (add_request + step) and read from the
  step record's device_time: each repetition gets fresh prompt tokens so the prefix cache
  cannot shortcut it, and a repetition that compiled is dropped.
swap_ms: the victim's blocks copied to the host pool and back (`runner.swap`, the copies a
  swap-out and a later swap-in run), None when the engine has no host pool (num_cpu_blocks 0).
Both are medians over `reps` after one untimed call. The blocks copied hold whatever the run
left there; a round trip writes back what it read, so the cache is unchanged.
"""

from __future__ import annotations

import time

import numpy as np


def _median_ms(fn, reps: int) -> float:
    fn()  # first call: any remaining allocation or dispatch warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times)) * 1e3


def recompute_ms(engine, victim_tokens: int, reps: int, vocab_size: int, seed: int | None = None) -> float:
    """Median device time (ms) of one step prefilling `victim_tokens` fresh prompt tokens
    (seed None: fresh entropy, so a second call on the same engine cannot hit the first's
    cached prompts)."""
    from jaxllm.sampling_params import SamplingParams

    if engine.has_unfinished_requests():
        raise ValueError("preemption_cost needs an idle engine (its run finished)")
    rng = np.random.default_rng(seed)
    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    records = []
    engine.add_step_observer(records.append)
    times = []
    try:
        for i in range(reps + 1):
            prompt = rng.integers(3, vocab_size, size=victim_tokens).tolist()
            engine.add_request(f"__preemption_victim_{i}", {"prompt_token_ids": prompt}, params)
            before = len(records)
            while engine.has_unfinished_requests():
                engine.step()
            steps = records[before:]
            if len(steps) != 1 or steps[0].num_prefill_tokens != victim_tokens:
                raise ValueError(f"victim_tokens={victim_tokens} does not fit one step "
                                 f"(max_num_batched_tokens, token budget): got {[s.num_prefill_tokens for s in steps]}")
            if i and steps[0].compile_time == 0:  # the first one is the warm call
                times.append(steps[0].device_time)
    finally:
        engine.remove_step_observer(records.append)
    if not times:
        raise RuntimeError("every victim step compiled: warm the engine up first")
    return float(np.median(times)) * 1e3


def swap_ms(engine, victim_tokens: int, reps: int) -> float | None:
    """Median time (ms) of copying a victim's blocks out to the host pool and back in."""
    import jax

    runner = engine.runner
    bs = engine.config.cache.block_size
    n = -(-victim_tokens // bs)
    if not engine.resolved.num_cpu_blocks or getattr(runner, "host_caches", None) is None:
        return None
    if n > min(engine.resolved.num_cpu_blocks, engine.resolved.num_kv_blocks) - 1:
        raise ValueError(f"victim_tokens={victim_tokens} needs {n} blocks of {bs}; the pools hold "
                         f"{engine.resolved.num_kv_blocks - 1} device / {engine.resolved.num_cpu_blocks} host blocks")
    pairs = [(1 + i, 1 + i) for i in range(n)]  # block 0 of both pools is scratch (the sink, copy padding)

    def round_trip():
        runner.swap(pairs, [])
        jax.block_until_ready(runner.host_caches)
        runner.swap([], [(h, d) for d, h in pairs])
        jax.block_until_ready(runner.kv_caches)

    return _median_ms(round_trip, reps)


def preemption_cost(engine, victim_tokens: int, reps: int, vocab_size: int) -> dict:
    """Both costs of preempting a victim with `victim_tokens` computed tokens (module docstring),
    with the bytes a swap copies (out and in, each read and written)."""
    if not isinstance(victim_tokens, int) or victim_tokens < 1:
        raise ValueError(f"victim_tokens must be a positive int, got {victim_tokens!r}")
    bs = engine.config.cache.block_size
    blocks = -(-victim_tokens // bs)
    rec = recompute_ms(engine, victim_tokens, reps, vocab_size)
    swp = swap_ms(engine, victim_tokens, reps)
    return {"victim_tokens": victim_tokens, "victim_blocks": blocks, "recompute_ms": rec, "swap_ms": swp,
            "swap_over_recompute": None if swp is None else swp / rec,
            "swap_bytes_copied": 2 * 2 * blocks * engine.resolved.bytes_per_block}
