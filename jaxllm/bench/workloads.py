"""Workloads: which requests a benchmark sends (numpy only, seeded; host only, never imports jax).

Lengths are written as short spec strings, so they go on a command line and into a results
JSON unchanged (an int N means fixed:N):

    fixed:N                          every request gets exactly N tokens
    uniform:LO:HI                    integers uniform in [LO, HI] (both inclusive)
    lognormal:MEDIAN:SIGMA:LO:HI     round(exp(N(log MEDIAN, SIGMA))) clipped to [LO, HI]

The lognormal is the ShareGPT-like shape: most conversations are short, a few very long (real
ShareGPT with a Llama tokenizer has prompt and output medians of ~100-250 tokens and a tail past
1000; on a CPU the presets keep the shape and scale the medians down).

Datasets (`make_requests`):
  random         prompts of random token ids, lengths from input_len / output_len
  sharegpt       a JSONL file, one request per line: a ShareGPT conversation
                 {"conversations": [{"from": "human", "value": ...}, {"from": "gpt", "value": ...}]}
                 or a pair {"prompt_len": P, "output_len": O}; either may carry "timestamp"
                 (seconds) for trace replay. A malformed line is a ValueError naming its number.
  shared-prefix  num_prefix_groups groups, each prompt its group's prefix + a random suffix
Each request may ask for n > 1 samples or a beam search (beam_width > 0).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Callable, Sequence

import numpy as np

# ShareGPT-like, scaled down for a CPU: prompt median 64 (tail to 512), output median 48 (tail to 384).
SHAREGPT_PROMPT = "lognormal:64:0.8:8:512"
SHAREGPT_OUTPUT = "lognormal:48:1.0:4:384"
SPECIAL_IDS = (0, 1, 2)  # pad / bos / eos of the random Llama models: kept out of prompts


@dataclasses.dataclass(frozen=True)
class LengthDist:
    """A parsed length distribution; `sample(n, rng)` -> [n] int64 lengths >= 1."""

    kind: str  # "fixed" | "uniform" | "lognormal"
    args: tuple[float, ...]

    @classmethod
    def parse(cls, spec) -> "LengthDist":
        """Parse an int, 'fixed:N', 'uniform:LO:HI' or 'lognormal:MEDIAN:SIGMA:LO:HI' (ValueError naming it)."""
        if isinstance(spec, LengthDist):
            return spec
        if isinstance(spec, int) and not isinstance(spec, bool):
            spec = f"fixed:{spec}"
        if not isinstance(spec, str):
            raise ValueError(f"length distribution {spec!r}: must be an int or a spec string")
        if spec == "sharegpt-prompt":
            spec = SHAREGPT_PROMPT
        elif spec == "sharegpt-output":
            spec = SHAREGPT_OUTPUT
        elif spec.isdigit():
            spec = f"fixed:{spec}"
        kind, *rest = spec.split(":")
        try:
            args = tuple(float(x) for x in rest)
        except ValueError:
            raise ValueError(f"length distribution {spec!r}: arguments must be numbers") from None
        expected = {"fixed": 1, "uniform": 2, "lognormal": 4}
        if kind not in expected:
            raise ValueError(f"length distribution {spec!r}: kind must be one of {sorted(expected)}")
        if len(args) != expected[kind]:
            raise ValueError(f"length distribution {spec!r}: {kind} takes {expected[kind]} arguments")
        if kind == "fixed" and args[0] < 1:
            raise ValueError(f"length distribution {spec!r}: N must be >= 1")
        if kind == "uniform" and not 1 <= args[0] <= args[1]:
            raise ValueError(f"length distribution {spec!r}: need 1 <= LO <= HI")
        if kind == "lognormal" and not (args[0] > 0 and args[1] >= 0 and 1 <= args[2] <= args[3]):
            raise ValueError(f"length distribution {spec!r}: need MEDIAN > 0, SIGMA >= 0, 1 <= LO <= HI")
        return cls(kind, args)

    @property
    def max_len(self) -> int:
        """Largest length this distribution can produce (sizes max_model_len)."""
        return int(self.args[0] if self.kind == "fixed" else self.args[-1])

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """[n] int64 lengths."""
        if self.kind == "fixed":
            return np.full(n, int(self.args[0]), np.int64)
        if self.kind == "uniform":
            lo, hi = int(self.args[0]), int(self.args[1])
            return rng.integers(lo, hi + 1, size=n).astype(np.int64)
        median, sigma, lo, hi = self.args
        x = np.rint(np.exp(rng.normal(np.log(median), sigma, size=n)))
        return np.clip(x, lo, hi).astype(np.int64)

    def __str__(self) -> str:
        return ":".join([self.kind] + [f"{a:g}" for a in self.args])


@dataclasses.dataclass(frozen=True)
class RequestSpec:
    """One benchmark request: what to send. Greedy unless the workload's temperature says not,
    and ignore_eos, so the output length is exact on every system."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    output_len: int
    n: int = 1
    beam_width: int = 0
    timestamp: float | None = None  # from a trace (seconds); arrivals.replay uses it
    prefix_group: int | None = None  # shared-prefix workloads: the group's index

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_token_ids)


@dataclasses.dataclass
class Workload:
    """N requests; `prompts` / `output_lens` / `prompt_lens` are the per-request views the
    systems use."""

    requests: list[RequestSpec]
    description: dict  # how it was made (dataset, specs, seed) for the results

    @property
    def num_requests(self) -> int:
        return len(self.requests)

    @property
    def prompts(self) -> list[list[int]]:
        return [list(r.prompt_token_ids) for r in self.requests]

    @property
    def prompt_lens(self) -> list[int]:
        return [r.prompt_len for r in self.requests]

    @property
    def output_lens(self) -> list[int]:
        return [r.output_len for r in self.requests]

    @property
    def max_model_len(self) -> int:
        return max(r.prompt_len + r.output_len for r in self.requests)

    def summary(self) -> dict:
        """Length statistics for the results."""
        def stats(x):
            x = np.asarray(x)
            return {"mean": float(x.mean()), "median": float(np.median(x)), "p90": float(np.percentile(x, 90)),
                    "min": int(x.min()), "max": int(x.max()), "total": int(x.sum())}

        return {"num_requests": self.num_requests, **self.description,
                "prompt_len": stats(self.prompt_lens), "output_len": stats(self.output_lens)}


def _random_ids(rng: np.random.Generator, n: int, vocab_size: int, special_ids=SPECIAL_IDS) -> list[int]:
    """n ids drawn uniformly above the highest of `special_ids`."""
    lo = max(special_ids) + 1
    if vocab_size <= lo:
        raise ValueError(f"vocab_size={vocab_size} leaves no ids above the special ids {tuple(special_ids)}")
    return rng.integers(lo, vocab_size, size=int(n)).tolist()


def random_workload(num_prompts: int, input_len, output_len, vocab_size: int, seed: int = 0,
                    n: int = 1, beam_width: int = 0, special_ids: tuple[int, ...] = SPECIAL_IDS) -> Workload:
    """Random token-id prompts; lengths drawn (seeded) from the two distributions. Prompts hold
    no id at or below max(special_ids) (a real tokenizer's specials, e.g. SmolLM2's 0..16)."""
    rng = np.random.default_rng(seed)
    pd, od = LengthDist.parse(input_len), LengthDist.parse(output_len)
    p_lens, o_lens = pd.sample(num_prompts, rng), od.sample(num_prompts, rng)
    reqs = [RequestSpec(str(i), tuple(_random_ids(rng, p, vocab_size, special_ids)), int(o), n, beam_width)
            for i, (p, o) in enumerate(zip(p_lens, o_lens))]
    description = {"dataset_name": "random", "input_len": str(pd), "output_len": str(od), "seed": seed}
    if tuple(special_ids) != SPECIAL_IDS:
        description["special_ids"] = f"0..{max(special_ids)}"
    return Workload(reqs, description)


def lengths_workload(prompt_lens: Sequence[int], output_lens: Sequence[int], vocab_size: int, seed: int = 0,
                     prefix: str = "") -> Workload:
    """Random token-id prompts of exactly the given lengths (request ids `prefix` + index): a
    workload whose lengths the caller drew (the simulator's experiments, tests)."""
    if len(prompt_lens) != len(output_lens):
        raise ValueError(f"prompt_lens and output_lens differ in length: {len(prompt_lens)}, {len(output_lens)}")
    rng = np.random.default_rng(seed)
    reqs = [RequestSpec(f"{prefix}{i}", tuple(_random_ids(rng, p, vocab_size)), int(o))
            for i, (p, o) in enumerate(zip(prompt_lens, output_lens))]
    return Workload(reqs, {"dataset_name": "lengths", "num_prompts": len(reqs), "seed": seed})


def shared_prefix_workload(num_prompts: int, num_prefix_groups: int, prefix_len: int, input_len, output_len,
                           vocab_size: int, seed: int = 0, n: int = 1, beam_width: int = 0) -> Workload:
    """Prompts in `num_prefix_groups` groups (request i in group i % groups): the group's
    prefix_len random tokens, then an input_len random suffix (the few-shot / system-prompt case)."""
    rng = np.random.default_rng(seed)
    prefixes = [_random_ids(rng, prefix_len, vocab_size) for _ in range(num_prefix_groups)]
    pd, od = LengthDist.parse(input_len), LengthDist.parse(output_len)
    s_lens, o_lens = pd.sample(num_prompts, rng), od.sample(num_prompts, rng)
    reqs = [RequestSpec(str(i), tuple(prefixes[i % num_prefix_groups] + _random_ids(rng, s, vocab_size)),
                        int(o), n, beam_width, prefix_group=i % num_prefix_groups)
            for i, (s, o) in enumerate(zip(s_lens, o_lens))]
    return Workload(reqs, {"dataset_name": "shared-prefix", "num_prefix_groups": num_prefix_groups,
                           "prefix_len": prefix_len, "input_len": str(pd), "output_len": str(od), "seed": seed})


def _word_ids(text: str, vocab_size: int) -> list[int]:
    """Token ids for a model without a tokenizer (random-init models): one id per
    whitespace-separated word, from a stable hash. Lengths are word counts, not BPE counts."""
    import zlib

    lo = max(SPECIAL_IDS) + 1
    return [lo + zlib.crc32(w.encode()) % (vocab_size - lo) for w in text.split()]


def read_jsonl(path: str) -> list[dict]:
    """The rows of a ShareGPT-style JSONL file (see the module docstring), checked; a malformed
    line raises ValueError naming the file and the line number. Blank lines are skipped."""
    rows = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}, line {lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
            if "conversations" in row:
                conv = row["conversations"]
                if (not isinstance(conv, list) or len(conv) < 2
                        or not all(isinstance(t, dict) and isinstance(t.get("value"), str) for t in conv[:2])):
                    raise ValueError(f"{where}: 'conversations' must be a list of at least two "
                                     f"{{'from', 'value'}} turns (prompt, then reply)")
            elif "prompt_len" in row or "output_len" in row:
                for k in ("prompt_len", "output_len"):
                    v = row.get(k)
                    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                        raise ValueError(f"{where}: {k} must be a positive int, got {v!r}")
            else:
                raise ValueError(f"{where}: needs 'conversations' or 'prompt_len' and 'output_len'")
            ts = row.get("timestamp")
            if ts is not None and (not isinstance(ts, (int, float)) or isinstance(ts, bool) or ts < 0):
                raise ValueError(f"{where}: timestamp must be a number of seconds >= 0, got {ts!r}")
            rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no requests in the file")
    return rows


def sharegpt_workload(path: str, num_prompts: int, vocab_size: int, seed: int = 0,
                      tokenize: Callable[[str], Sequence[int]] | None = None, output_len=None,
                      n: int = 1, beam_width: int = 0, max_model_len: int | None = None) -> Workload:
    """The first num_prompts requests of a JSONL file, in file order. A conversation's prompt is
    its first turn and its output length the token count of its second (as vLLM's ShareGPT
    sampler), unless output_len is given; (prompt_len, output_len) rows get random prompt ids
    of that length. `tokenize`: the model's tokenizer; without one, words are ids
    (`_word_ids`). Requests longer than max_model_len are skipped, as vLLM's sampler does."""
    rng = np.random.default_rng(seed)
    tok = tokenize or (lambda text: _word_ids(text, vocab_size))
    od = LengthDist.parse(output_len) if output_len is not None else None
    reqs: list[RequestSpec] = []
    for row in read_jsonl(path):
        if len(reqs) == num_prompts:
            break
        if "conversations" in row:
            prompt = list(tok(row["conversations"][0]["value"]))
            out = max(1, len(tok(row["conversations"][1]["value"])))
            if not prompt:
                continue  # an empty first turn is no request
        else:
            prompt, out = _random_ids(rng, row["prompt_len"], vocab_size), row["output_len"]
        if od is not None:
            out = int(od.sample(1, rng)[0])
        if max_model_len is not None and len(prompt) + out > max_model_len:
            continue
        reqs.append(RequestSpec(str(len(reqs)), tuple(int(t) for t in prompt), int(out), n, beam_width,
                                timestamp=row.get("timestamp")))
    if not reqs:
        raise ValueError(f"{path}: no request fits (max_model_len={max_model_len})")
    return Workload(reqs, {"dataset_name": "sharegpt", "dataset_path": path, "seed": seed})


def make_workload(cfg, vocab_size: int, tokenize=None, max_model_len: int | None = None) -> Workload:
    """The requests a WorkloadConfig (bench/config.py) describes."""
    if cfg.dataset_name == "random":
        return random_workload(cfg.num_prompts, cfg.input_len, cfg.output_len, vocab_size, cfg.seed,
                               cfg.n, cfg.beam_width)
    if cfg.dataset_name == "shared-prefix":
        return shared_prefix_workload(cfg.num_prompts, cfg.num_prefix_groups, cfg.prefix_len, cfg.input_len,
                                      cfg.output_len, vocab_size, cfg.seed, cfg.n, cfg.beam_width)
    return sharegpt_workload(cfg.dataset_path, cfg.num_prompts, vocab_size, cfg.seed, tokenize,
                             n=cfg.n, beam_width=cfg.beam_width, max_model_len=max_model_len)
