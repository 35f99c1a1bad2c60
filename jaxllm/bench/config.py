"""Benchmark configuration: frozen dataclasses, from a TOML file or from command-line flags.

    [engine]                       # LLM(...) keywords (jaxllm/llm.py)
    block_size = 16
    max_num_seqs = 32
    [workload]                     # what requests, and when they arrive
    num_prompts = 64
    input_len = "lognormal:64:0.8:8:512"
    request_rate = 4.0             # requests/s; "inf" (default): all at once
    # top level
    model = "random:tiny"
    systems = ["jaxllm", "hf_static"]

Field names are vLLM's where they exist (`num_prompts`, `input_len`, `output_len`,
`dataset_name`, `dataset_path`, `request_rate`, `burstiness`, `seed`), so every field is also a
flag (`--num-prompts`). Every field name is unique across the sections, so a sweep or a flat
dict may name a field without its section (`block_size`) or with it (`engine.block_size`).
An unknown field, a rate <= 0 or a malformed length is a ValueError naming it, before anything
runs. Host only: never imports jax.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import tomllib
from typing import Any

from jaxllm.bench.workloads import LengthDist

DATASETS = ("random", "sharegpt", "shared-prefix")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


@dataclasses.dataclass(frozen=True)
class EngineArgs:
    """jaxllm engine settings: the LLM(...) keywords of the same names (see jaxllm/config.py).
    The peers get the same batch limits, page size and KV budget where they have them."""

    dtype: str = "float32"
    block_size: int = 16
    num_kv_blocks: int | None = None  # None: sized from kv_cache_memory_bytes
    kv_cache_memory_bytes: int | None = 1 << 30
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 512
    max_model_len: int | None = None  # None: the workload's longest request
    scheduling_policy: Any = "fcfs"  # a policy name or a SchedulingPolicy object (Python API)
    enable_chunked_prefill: bool = True
    enable_prefix_caching: bool = True
    preemption_mode: str = "recompute"
    swap_space: float = 4.0
    token_buckets: tuple[int, ...] | None = None
    attention_backend: str = "auto"
    matmul_backend: str = "auto"

    def __post_init__(self):
        if isinstance(self.token_buckets, list):
            object.__setattr__(self, "token_buckets", tuple(self.token_buckets))
        if self.num_kv_blocks is not None and self.kv_cache_memory_bytes is not None:
            # A block count wins over the default byte budget (one way to size the cache).
            object.__setattr__(self, "kv_cache_memory_bytes", None)
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens"):
            v = getattr(self, name)
            _require(isinstance(v, int) and v >= 1, f"{name} must be a positive int, got {v!r}")


@dataclasses.dataclass(frozen=True)
class WorkloadConfig:
    """Which requests (lengths, dataset, sharing) and when they arrive (bench/arrivals.py)."""

    dataset_name: str = "random"  # random | sharegpt (a JSONL file) | shared-prefix
    dataset_path: str | None = None  # JSONL: conversations or {"prompt_len", "output_len"} rows
    num_prompts: int = 64
    # A length: an int, or a spec "fixed:N" / "uniform:LO:HI" / "lognormal:MEDIAN:SIGMA:LO:HI".
    input_len: Any = "lognormal:64:0.8:8:512"
    output_len: Any = "lognormal:48:1.0:4:384"
    # shared-prefix: num_prefix_groups groups; each prompt is its group's prefix_len-token
    # prefix followed by an input_len suffix.
    num_prefix_groups: int = 4
    prefix_len: int = 64
    n: int = 1  # parallel samples per request (SamplingParams.n)
    beam_width: int = 0  # > 0: beam search requests (LLM.beam_search), offline only
    request_rate: float = math.inf  # requests/s; inf: all at once (offline throughput)
    burstiness: float = 1.0  # gamma shape of the inter-arrival times; 1: Poisson (vLLM's flag)
    replay_timestamps: bool = False  # arrivals from the dataset's "timestamp" field
    seed: int = 0
    temperature: float = 0.0  # 0: greedy (every request ignores EOS, so lengths are exact)

    def __post_init__(self):
        if isinstance(self.request_rate, str):
            object.__setattr__(self, "request_rate", float(self.request_rate))
        _require(self.dataset_name in DATASETS,
                 f"dataset_name must be one of {DATASETS}, got {self.dataset_name!r}")
        _require(self.dataset_name != "sharegpt" or self.dataset_path,
                 "dataset_name='sharegpt' needs dataset_path (a JSONL file)")
        _require(isinstance(self.num_prompts, int) and self.num_prompts >= 1,
                 f"num_prompts must be a positive int, got {self.num_prompts!r}")
        _require(isinstance(self.request_rate, (int, float)) and self.request_rate > 0,
                 f"request_rate must be > 0 requests/s (inf: all at once), got {self.request_rate!r}")
        _require(isinstance(self.burstiness, (int, float)) and math.isfinite(self.burstiness)
                 and self.burstiness > 0, f"burstiness must be a finite number > 0, got {self.burstiness!r}")
        _require(isinstance(self.n, int) and self.n >= 1, f"n must be a positive int, got {self.n!r}")
        _require(isinstance(self.beam_width, int) and self.beam_width >= 0,
                 f"beam_width must be an int >= 0, got {self.beam_width!r}")
        _require(isinstance(self.num_prefix_groups, int) and self.num_prefix_groups >= 1,
                 f"num_prefix_groups must be a positive int, got {self.num_prefix_groups!r}")
        _require(isinstance(self.prefix_len, int) and self.prefix_len >= 0,
                 f"prefix_len must be an int >= 0, got {self.prefix_len!r}")
        for name in ("input_len", "output_len"):
            LengthDist.parse(getattr(self, name))  # raises naming the spec

    @property
    def offline(self) -> bool:
        return math.isinf(self.request_rate) and not self.replay_timestamps


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """One benchmark run: a model, the systems to compare, engine settings and a workload."""

    # A local HF directory, a .gguf file, an alias, or "random:tiny" / "random:small" /
    # "random:138m": a random-init Llama built once under model_cache_dir (bench/models.py).
    model: str = "random:tiny"
    systems: tuple[str, ...] = ("jaxllm",)
    engine: EngineArgs = EngineArgs()
    workload: WorkloadConfig = WorkloadConfig()
    # Goodput SLOs (ms), vLLM's --goodput: a request counts when it meets every one given.
    slo_ttft_ms: float | None = None
    slo_tpot_ms: float | None = None
    slo_e2e_ms: float | None = None
    warmup: bool = True  # compile every bucket before the clock starts (compile time kept apart)
    measure_roofline: bool = True  # the machine's matmul peak and bandwidth at the start
    roofline_size: str = "full"  # "full" (2048^2 matmul, 256 MiB) or "quick" (512^2, 16 MiB)
    output_dir: str = "experiments/results/runs"
    model_cache_dir: str = "~/.cache/jaxllm/bench_models"
    hf_cb_timeout: float = 1800.0
    # The "sim" system's step-cost model: a hardware profile name (jaxllm.sim.hardware.PROFILES)
    # or the path of a LinearCostModel JSON fitted with jaxllm.sim.fit. Its results are predictions.
    sim_cost_model: str = "h100-sxm"
    torch_threads: int | None = None
    # > 0: after its timed run, jaxllm measures what preempting a victim with this many computed
    # tokens costs by recompute and by swap (bench/preemption.py; the paper's Fig. 19), median
    # of preemption_cost_reps; at most max_num_batched_tokens (one prefill step).
    preemption_cost_tokens: int = 0
    preemption_cost_reps: int = 5

    def __post_init__(self):
        if isinstance(self.systems, (list, str)):
            object.__setattr__(self, "systems", tuple([self.systems] if isinstance(self.systems, str) else self.systems))
        from jaxllm.bench.systems import RUNNERS  # host only: the runners import lazily

        for s in self.systems:
            _require(s in RUNNERS, f"unknown system {s!r}; choose from {sorted(RUNNERS)}")
        _require(isinstance(self.sim_cost_model, str) and self.sim_cost_model.strip() != "",
                 f"sim_cost_model must be a hardware profile name or a .json path, got {self.sim_cost_model!r}")
        _require(self.roofline_size in ("full", "quick"),
                 f"roofline_size must be 'full' or 'quick', got {self.roofline_size!r}")
        for name in ("slo_ttft_ms", "slo_tpot_ms", "slo_e2e_ms"):
            v = getattr(self, name)
            _require(v is None or (isinstance(v, (int, float)) and v > 0), f"{name} must be > 0 ms, got {v!r}")
        for name in ("preemption_cost_tokens", "preemption_cost_reps"):
            v = getattr(self, name)
            _require(isinstance(v, int) and not isinstance(v, bool) and v >= 0, f"{name} must be an int >= 0, got {v!r}")
        _require(self.preemption_cost_tokens <= self.engine.max_num_batched_tokens,
                 f"preemption_cost_tokens={self.preemption_cost_tokens} must fit one step "
                 f"(max_num_batched_tokens={self.engine.max_num_batched_tokens})")
        _require(not self.preemption_cost_tokens or self.preemption_cost_reps >= 1,
                 f"preemption_cost_reps must be >= 1, got {self.preemption_cost_reps!r}")
        if self.workload.beam_width and self.workload.n > 1:
            raise ValueError("give n > 1 or beam_width > 0, not both")

    def to_dict(self) -> dict:
        """JSON-able nested dict (a policy object is written as its class's qualified name)."""
        return _jsonable(dataclasses.asdict(self))

    def config_hash(self) -> str:
        """12 hex digits naming this resolved config (the run directory's name)."""
        d = self.to_dict()
        for k in ("output_dir", "model_cache_dir"):  # where results go does not change the run
            d.pop(k)
        if "sim" not in self.systems:  # only the simulator reads it: other runs keep their hashes
            d.pop("sim_cost_model")
        if not self.preemption_cost_tokens:  # off: runs from before the field keep their hashes
            d.pop("preemption_cost_tokens")
            d.pop("preemption_cost_reps")
        return hashlib.sha1(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]

    def replace(self, **fields) -> "BenchConfig":
        """A copy with fields changed, named flat (`block_size`) or dotted (`engine.block_size`)."""
        top: dict[str, Any] = {}
        sections = {name: getattr(self, name) for name in SECTIONS}
        for name, value in fields.items():
            section, field = field_path(name)
            if section is None:
                top[field] = value
            else:
                change = {field: value}
                if field == "kv_cache_memory_bytes" and value is not None:
                    change["num_kv_blocks"] = None  # the cache is sized one way: the one set last
                sections[section] = dataclasses.replace(sections[section], **change)
        # One construction: checks across sections see every change at once.
        return dataclasses.replace(self, **sections, **top)


SECTIONS = {"engine": EngineArgs, "workload": WorkloadConfig}


def _field_names(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def all_fields() -> dict[str, str | None]:
    """Every settable field name -> its section (None: top level)."""
    out: dict[str, str | None] = {f: None for f in _field_names(BenchConfig) if f not in SECTIONS}
    for section, cls in SECTIONS.items():
        for f in _field_names(cls):
            assert f not in out, f  # names are unique across sections (flat names rely on it)
            out[f] = section
    return out


def field_path(name: str) -> tuple[str | None, str]:
    """(section, field) of a flat or dotted field name; ValueError naming an unknown one."""
    fields = all_fields()
    if "." in name:
        section, field = name.split(".", 1)
        if section not in SECTIONS or field not in _field_names(SECTIONS[section]):
            raise ValueError(f"unknown config field {name!r}")
        return section, field
    if name not in fields:
        raise ValueError(f"unknown config field {name!r}; fields: {sorted(fields)}")
    return fields[name], name


def from_dict(d: dict) -> BenchConfig:
    """A BenchConfig from nested ({"engine": {...}}) and/or flat keys; unknown keys raise."""
    flat: dict[str, Any] = {}
    for key, value in d.items():
        if key in SECTIONS:
            if not isinstance(value, dict):
                raise ValueError(f"config section {key!r} must be a table, got {value!r}")
            for k, v in value.items():
                section, field = field_path(f"{key}.{k}")
                flat[f"{section}.{field}"] = v
        elif key == "sweep":
            raise ValueError("a [sweep] table belongs in a sweep file (jaxllm bench sweep), not a run config")
        else:
            section, field = field_path(key)
            flat[f"{section}.{field}" if section else field] = value
    return BenchConfig().replace(**flat)


def load_toml(path: str) -> tuple[BenchConfig, dict[str, list]]:
    """(config, sweep axes) from a TOML file; the optional [sweep] table maps field -> values."""
    with open(path, "rb") as f:
        try:
            d = tomllib.load(f)
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"{path}: not valid TOML: {e}") from None
    sweep = d.pop("sweep", {})
    try:
        return from_dict(d), sweep
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def _jsonable(x):
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and math.isinf(x):
        return "inf"
    if x is None or isinstance(x, (str, int, float, bool)):
        return x
    cls = type(x)
    return f"{cls.__module__}.{cls.__qualname__}"
