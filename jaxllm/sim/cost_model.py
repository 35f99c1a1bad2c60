"""Step-cost models: how long one engine step takes, from what the step computes. Host only
(numpy; the optax fit lives in jaxllm/sim/fit.py).

A step is described by its StepShape (the same numbers whether read from the scheduler's plan
while simulating or from a recorded StepStats row while fitting), turned into roofline-inspired
features in physical units by `step_features`:

    step             1 per step (launch, weight streaming at small batch, fixed host work)
    matmul_flops     padded tokens x 2 x decoder matmul weights (the jitted step runs the bucket)
    lm_head_flops    padded rows x 2 x V x H (one sampled position per row)
    kv_bytes         context tokens x K/V bytes per token (attention reads the cache)
    attention_flops  (sum over prefill chunks of n^2) / 2 x 4 nH D L (causal pairs inside chunks)
    swap_bytes       swapped blocks x bytes per block (host <-> device copies)
    rows, tokens     real batch rows and tokens (host-side preparation and bookkeeping)
    decode_rows      rows feeding one sampled token (per-row gathers, sampling)
    token_tile_kv_bytes  K/V bytes the attention's per-token tiles gather: rows with few new
                     tokens (decodes) go token by token, TOKEN_TILE tokens a tile sorted by
                     context, each tile reading TOKEN_CHUNK-token chunks up to its longest
                     context (jaxllm/attention/reference.py, the CPU engine's attention), so
                     the cost follows each row's context rounded up, not the batch's sum
    query_tile_kv_bytes  K/V bytes the query tiles of longer chunks read: each Q_TILE queries
                     read the context up to their last position once, in chunks of 32, 128 or
                     512 tokens by its length, the last one whole (a chunk after a cached prefix
                     attends to all of it: kv_bytes counts that prefix once per row)
    attention_chunks     online-softmax chunk iterations of both kinds of tile (the count behind
                     the two K/V byte features): each is a while-loop iteration with gathers,
                     two small matmuls and a few elementwise ops, whose fixed cost dominates at
                     small chunks (a 20-token prompt chunk next to decodes)
    query_tiles      query tiles run (each selects a chunk width and writes its rows back)
    kernel_kv_bytes  (query, key) pairs of the C++ kernel (attention_backend "cpu", the CPU
                     default: jaxllm/attention/cpu) as K/V bytes: it takes every row instead of the
                     tiles above and reads keys in place, each query over exactly its context
    kernel_tokens    queries that kernel takes
    bucket_switch    1 when the step runs another token bucket's executable than the step before
                     (or is the first): measured here, such a step takes ~1 ms more, most visible
                     on a small prompt chunk between decodes (an executable that did not just run
                     starts with cold caches)

A cost model maps those features to a StepTime: host work before the device (scheduling,
building inputs), the forward on the device, the swap copies, host work after it (updating
requests, outputs) and the loop's time until the next step starts. `LinearCostModel` is
time = coefficients . features for each part, fitted to measured steps; `jaxllm.sim.hardware`'s
RooflineCostModel predicts from a HardwareProfile instead (a model, not a measurement).
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import NamedTuple

import numpy as np

from jaxllm.runner.batch import padded_shape
from jaxllm.sim.model_costs import ModelCosts

FEATURES = ("step", "matmul_flops", "lm_head_flops", "kv_bytes", "attention_flops", "swap_bytes", "rows", "tokens",
            "decode_rows", "token_tile_kv_bytes", "query_tile_kv_bytes", "attention_chunks", "query_tiles", "bucket_switch",
            "kernel_kv_bytes", "kernel_tokens")
_F = {name: i for i, name in enumerate(FEATURES)}

# The tiling of jaxllm/attention/reference.py (its _SHARED_MIN_Q_LEN, _TOKEN_TILE,
# _TOKEN_CHUNK_TOKENS and q_tile defaults), which the features above follow.
SHARED_MIN_Q_LEN, TOKEN_TILE, TOKEN_CHUNK, Q_TILE = 8, 8, 64, 32
QUERY_CHUNK_TOKENS, CHUNKS_PER_WIDTH = (32, 128, 512), 4  # its _SEQ_CHUNK_TOKENS, _CHUNKS_PER_WIDTH


class AttentionReads(NamedTuple):
    """What the reference attention's tiles do for one step (see the module docstring)."""

    token_tile_kv: int  # K/V tokens the per-token tiles gather
    query_tile_kv: int  # K/V tokens the query tiles read
    chunks: int  # online-softmax chunk iterations, both kinds of tile
    query_tiles: int  # query tiles run
    kernel_kv: int = 0  # (query, key) pairs of the C++ kernel (cpu_kernel only)
    kernel_tokens: int = 0  # queries the C++ kernel takes (cpu_kernel only)


def attention_tiles(q_lens, num_computed, block_size: int, cpu_kernel: bool = False) -> AttentionReads:
    """What the reference attention reads and loops over for rows with q_lens[i] new tokens after
    num_computed[i] cached ones (see the module docstring). cpu_kernel: every row goes to
    the C++ kernel (attention_backend "cpu"), which reads exactly each query's context, instead of
    to the tiles."""
    needs = []  # blocks each per-token query reads (its context rounded up to blocks)
    kernel_kv = kernel_tokens = 0
    query_kv = query_chunks = query_tiles = 0
    for q, c in zip(q_lens, num_computed):
        if cpu_kernel:
            kernel_kv += q * c + q * (q + 1) // 2  # query j attends to c + j + 1 keys
            kernel_tokens += q
        elif q >= SHARED_MIN_Q_LEN:
            for t in range(-(-q // Q_TILE)):
                # Tile t reads keys [0, c + min(Q_TILE (t + 1), q)) in chunks of the smallest
                # QUERY_CHUNK_TOKENS width that needs at most CHUNKS_PER_WIDTH of them (or the
                # largest), the last chunk whole.
                need = -(-(c + min(Q_TILE * (t + 1), q)) // block_size) * block_size
                width = next((w for w in QUERY_CHUNK_TOKENS[:-1] if need <= CHUNKS_PER_WIDTH * w),
                             QUERY_CHUNK_TOKENS[-1])
                chunk = max(1, width // block_size) * block_size
                query_kv += -(-need // chunk) * chunk
                query_chunks += -(-need // chunk)
                query_tiles += 1
        elif q == 1:
            needs.append(-(-(c + 1) // block_size))
        else:
            needs.extend(-(-(c + j + 1) // block_size) for j in range(q))
    needs.sort()
    chunk_blocks = max(1, TOKEN_CHUNK // block_size)
    n = len(needs)
    # A tile of TOKEN_TILE sorted tokens loops over as many chunks as its last (longest) needs.
    token_chunks = sum(-(-needs[min(i + TOKEN_TILE, n) - 1] // chunk_blocks) for i in range(0, n, TOKEN_TILE))
    return AttentionReads(token_chunks * TOKEN_TILE * chunk_blocks * block_size, query_kv,
                          token_chunks + query_chunks, query_tiles, kernel_kv, kernel_tokens)


# Which features each part of a step may depend on (a coefficient outside its part is fixed at 0).
PARTS = {
    "host_before": ("step", "rows", "tokens"),
    "device": ("step", "matmul_flops", "lm_head_flops", "kv_bytes", "attention_flops", "swap_bytes",
               "decode_rows", "token_tile_kv_bytes", "query_tile_kv_bytes", "attention_chunks", "query_tiles",
               "bucket_switch", "kernel_kv_bytes", "kernel_tokens"),
    "host_after": ("step", "rows"),
    "between": ("step",),
}


class StepTime(NamedTuple):
    """Predicted seconds of one step's parts. device = forward + swap."""

    host_before: float
    forward: float
    swap: float
    host_after: float
    between: float

    @property
    def device(self) -> float:
        return self.forward + self.swap

    @property
    def total(self) -> float:
        return self.host_before + self.device + self.host_after + self.between


@dataclasses.dataclass(frozen=True)
class StepShape:
    """What one step computes (all counts)."""

    num_tokens: int  # real tokens in the batch
    padded_tokens: int  # the token bucket it ran in
    num_rows: int  # requests in the batch
    padded_rows: int  # rows of the bucket: min(padded_tokens, max_num_seqs)
    num_decode_rows: int
    context_tokens: int  # sum over rows of cached + new tokens
    chunk_sq_tokens: int  # sum over rows with more than one new token of num_new_tokens^2
    swap_blocks: int = 0  # blocks copied out + in
    token_tile_kv_tokens: int = 0  # attention_tiles: the per-token tiles' KV reads (tokens)
    query_tile_kv_tokens: int = 0  # attention_tiles: the query tiles' KV reads (tokens)
    attention_chunks: int = 0  # attention_tiles: chunk iterations of both kinds of tile
    query_tiles: int = 0  # attention_tiles: query tiles run
    kernel_kv_tokens: int = 0  # attention_tiles: the C++ kernel's (query, key) pairs
    kernel_tokens: int = 0  # attention_tiles: queries the C++ kernel takes
    bucket_switch: int = 1  # 1: the step before ran another bucket (or there was none)

    @classmethod
    def from_plan(cls, scheduled, token_buckets: tuple[int, ...], max_num_seqs: int, swap_blocks: int = 0,
                  block_size: int = 16, previous_padded_tokens: int | None = None,
                  cpu_kernel: bool = False) -> "StepShape":
        """From the scheduler's ScheduledRequest items (batch order), as the engine would run them;
        previous_padded_tokens: the bucket of the step before (None: this is the first);
        cpu_kernel: the engine's attention is the "cpu" backend (see attention_tiles)."""
        num_tokens = context = chunk_sq = decode = 0
        q_lens, computed = [], []
        for item in scheduled:
            n = item.num_new_tokens
            num_tokens += n
            context += item.num_computed_tokens + n
            if n > 1:
                chunk_sq += n * n
            elif item.num_computed_tokens >= len(item.request.prompt_token_ids):
                decode += 1
            q_lens.append(n)
            computed.append(item.num_computed_tokens)
        t_pad, s_pad = padded_shape(num_tokens, token_buckets, max_num_seqs) if scheduled else (0, 0)
        reads = attention_tiles(q_lens, computed, block_size, cpu_kernel)
        return cls(num_tokens, t_pad, len(scheduled), s_pad, decode, context, chunk_sq, swap_blocks, *reads,
                   bucket_switch=int(t_pad != previous_padded_tokens))

    @classmethod
    def from_stats(cls, stats, max_num_seqs: int, block_size: int = 16,
                   previous_padded_tokens: int | None = None, cpu_kernel: bool = False) -> "StepShape":
        """From a StepStats record (or its dataclasses.asdict / DataFrame row dict);
        previous_padded_tokens and cpu_kernel as for from_plan (step_table passes the record
        before). A record
        without row_num_computed_tokens (older tables) spreads the context the way
        bench.roofline.ModelCost.step_cost_from_stats does: prefill rows attend to their own
        chunk, one-token rows share the rest evenly."""
        get = stats.__getitem__ if isinstance(stats, dict) else lambda k: getattr(stats, k)
        t_pad = int(get("num_padded_tokens"))
        q_lens = [int(n) for _, n in get("scheduled")]
        chunk_sq = sum(n * n for n in q_lens if n > 1)
        try:
            computed = [int(c) for c in get("row_num_computed_tokens")]
        except (KeyError, AttributeError):
            computed = []
        if len(computed) != len(q_lens):
            ones = sum(n == 1 for n in q_lens)
            rest = max(int(get("num_context_tokens")) - sum(n for n in q_lens if n > 1) - ones, 0)
            computed = [rest // ones if n == 1 else 0 for n in q_lens] if ones else [0] * len(q_lens)
        reads = attention_tiles(q_lens, computed, block_size, cpu_kernel)
        return cls(
            num_tokens=int(get("num_batched_tokens")),
            padded_tokens=t_pad,
            num_rows=int(get("num_scheduled_requests")),
            padded_rows=min(t_pad, max_num_seqs),
            num_decode_rows=int(get("num_decode_requests")),
            context_tokens=int(get("num_context_tokens")),
            chunk_sq_tokens=chunk_sq,
            swap_blocks=int(get("num_blocks_swapped_out")) + int(get("num_blocks_swapped_in")),
            token_tile_kv_tokens=reads.token_tile_kv,
            query_tile_kv_tokens=reads.query_tile_kv,
            attention_chunks=reads.chunks,
            query_tiles=reads.query_tiles,
            kernel_kv_tokens=reads.kernel_kv,
            kernel_tokens=reads.kernel_tokens,
            bucket_switch=int(t_pad != previous_padded_tokens),
        )


def uses_cpu_kernel(attention_backend: str) -> bool:
    """Whether an engine with this (resolved) attention backend runs the C++ kernel
    (jaxllm/attention/cpu) instead of the reference's tiles."""
    if attention_backend == "auto":
        raise ValueError('attention_backend "auto" must be resolved first (the backend the engine ran: '
                         'jaxllm.runner.resolve_attention_backend, or a LinearCostModel\'s attention_backend)')
    return attention_backend == "cpu"


def step_features(shape: StepShape, costs: ModelCosts, bytes_per_block: int) -> np.ndarray:
    """[len(FEATURES)] float64 features of one step (see the module docstring)."""
    return np.array([
        1.0,
        shape.padded_tokens * 2.0 * costs.matmul_params,
        shape.padded_rows * 2.0 * costs.lm_head_params,
        shape.context_tokens * float(costs.kv_bytes_per_token),
        shape.chunk_sq_tokens / 2.0 * costs.attention_flops_per_pair,
        shape.swap_blocks * float(bytes_per_block),
        float(shape.num_rows),
        float(shape.num_tokens),
        float(shape.num_decode_rows),
        shape.token_tile_kv_tokens * float(costs.kv_bytes_per_token),
        shape.query_tile_kv_tokens * float(costs.kv_bytes_per_token),
        float(shape.attention_chunks),
        float(shape.query_tiles),
        float(shape.bucket_switch),
        shape.kernel_kv_tokens * float(costs.kv_bytes_per_token),
        float(shape.kernel_tokens),
    ])


def _records(steps) -> list[dict]:
    """StepStats records, dicts, or a pandas DataFrame of dataclasses.asdict(StepStats) rows -> dicts."""
    if hasattr(steps, "to_dict"):
        return steps.to_dict("records")
    return [s if isinstance(s, dict) else dataclasses.asdict(s) for s in steps]


def step_table(steps, costs: ModelCosts, bytes_per_block: int, max_num_seqs: int,
               block_size: int | None = None, attention_backend: str = "reference") -> tuple[np.ndarray, dict]:
    """Features and measured times of recorded steps; attention_backend: the one the recorded
    engine ran, resolved ("auto" is not known here: jaxllm.runner.resolve_attention_backend).

    Returns X [N, len(FEATURES)] and {part: (y [N] seconds, valid [N] bool)} for the PARTS.
    A step that compiled is invalid for every part; `between` is only valid when the loop went
    straight on to the next step (requests left after it, a next record exists).
    """
    rows = _records(steps)
    if block_size is None:  # one device holds every layer and K/V head: a block's bytes say its size
        block_size = bytes_per_block // max(costs.kv_bytes_per_token, 1) if bytes_per_block else 16
    # The bucket of the record before, where it is the step before (tables may join several runs).
    previous = [rows[i - 1]["num_padded_tokens"] if i and rows[i]["step"] == rows[i - 1]["step"] + 1 else None
                for i in range(len(rows))]
    kernel = uses_cpu_kernel(attention_backend)
    X = np.stack([step_features(StepShape.from_stats(r, max_num_seqs, block_size, prev, kernel), costs, bytes_per_block)
                  for r, prev in zip(rows, previous)]) \
        if rows else np.zeros((0, len(FEATURES)))
    col = lambda k: np.array([float(r[k]) for r in rows])  # noqa: E731
    start, time, end, device = col("start_time"), col("time"), col("end_time"), col("device_time")
    clean = col("compile_time") == 0
    busy = (col("num_running") + col("num_waiting")) > 0
    next_start = np.append(start[1:], np.nan)
    consecutive = np.append(col("step")[1:] == col("step")[:-1] + 1, False)
    between_ok = clean & busy & consecutive
    targets = {
        "host_before": (time - start - device, clean),
        "device": (device, clean),
        "host_after": (end - time, clean),
        "between": (np.where(between_ok, next_start - end, 0.0), between_ok),
    }
    return X, targets


class LinearCostModel:
    """time(part) = coefficients[part] . step_features, for each part of a step (PARTS).

    Coefficients are in seconds per feature unit (1 / effective FLOP/s, 1 / effective B/s, seconds
    per step, per row, per token). Fitted by jaxllm.sim.fit.fit_cost_model; saved as JSON.
    """

    name = "linear"

    def __init__(self, coefficients: dict[str, dict[str, float]], meta: dict | None = None):
        unknown = sorted(set(coefficients) - set(PARTS))
        if unknown:
            raise ValueError(f"unknown cost-model part(s) {unknown}; parts: {list(PARTS)}")
        self.coef = {part: np.zeros(len(FEATURES)) for part in PARTS}
        for part, values in coefficients.items():
            for feature, value in values.items():
                if feature not in PARTS[part]:
                    raise ValueError(f"cost-model part {part!r} has no feature {feature!r}; it has {list(PARTS[part])}")
                if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                    raise ValueError(f"coefficient {part}.{feature} must be a finite number >= 0, got {value!r}")
                self.coef[part][_F[feature]] = float(value)
        self.meta = dict(meta or {})

    @classmethod
    def zeros(cls) -> "LinearCostModel":
        """Every step takes no time (replay without a cost model), whatever the attention."""
        return cls({}, {"attention_backend": None})

    @property
    def attention_backend(self) -> str | None:
        """The attention backend of the engine whose steps this model was fitted to (its
        attention features are only fitted for that one); older models: "reference";
        None: any (zeros)."""
        return self.meta.get("attention_backend", "reference")

    def scaled(self, factor: float) -> "LinearCostModel":
        """Every step `factor` times as long (a what-if: a machine that much slower or faster)."""
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not math.isfinite(factor) or factor <= 0:
            raise ValueError(f"factor must be a finite number > 0, got {factor!r}")
        return LinearCostModel({p: {f: v * factor for f, v in c.items()} for p, c in self.coefficients().items()},
                               {**self.meta, "scaled_by": factor})

    def predict(self, x: np.ndarray) -> StepTime:
        """StepTime of one step's features x [len(FEATURES)] (swap_bytes go to `swap`)."""
        dev = self.coef["device"]
        swap = dev[_F["swap_bytes"]] * x[_F["swap_bytes"]]
        return StepTime(
            host_before=float(self.coef["host_before"] @ x),
            forward=float(dev @ x - swap),
            swap=float(swap),
            host_after=float(self.coef["host_after"] @ x),
            between=float(self.coef["between"] @ x),
        )

    def predict_table(self, X: np.ndarray) -> dict[str, np.ndarray]:
        """{part: [N] seconds} for features X [N, len(FEATURES)]."""
        return {part: X @ c for part, c in self.coef.items()}

    def swap_seconds(self, swap_bytes: float) -> float:
        return float(self.coef["device"][_F["swap_bytes"]] * swap_bytes)

    def coefficients(self) -> dict[str, dict[str, float]]:
        return {part: {f: float(self.coef[part][_F[f]]) for f in PARTS[part]} for part in PARTS}

    def describe(self) -> dict:
        """The device coefficients as effective rates (what the fit says the machine achieves)."""
        d = self.coef["device"]
        rate = lambda c: (1.0 / c) if c > 0 else math.inf  # noqa: E731
        return {
            "step_s": float(d[_F["step"]]),
            "matmul_flops_per_s": rate(d[_F["matmul_flops"]]),
            "lm_head_flops_per_s": rate(d[_F["lm_head_flops"]]),
            "kv_bytes_per_s": rate(d[_F["kv_bytes"]]),
            "attention_flops_per_s": rate(d[_F["attention_flops"]]),
            "swap_bytes_per_s": rate(d[_F["swap_bytes"]]),
        }

    def to_json(self) -> str:
        return json.dumps({"kind": "linear", "features": list(FEATURES), "coefficients": self.coefficients(),
                           "meta": self.meta}, indent=2)

    @classmethod
    def from_json(cls, text: str) -> "LinearCostModel":
        d = json.loads(text)
        if d.get("kind") != "linear":
            raise ValueError(f"not a linear cost model (kind={d.get('kind')!r})")
        return cls(d["coefficients"], d.get("meta"))

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            f.write(self.to_json())

    @classmethod
    def load(cls, path: str) -> "LinearCostModel":
        with open(path) as f:
            return cls.from_json(f.read())
