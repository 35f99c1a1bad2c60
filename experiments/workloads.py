"""Request-length distributions for throughput experiments (numpy only, seeded, no jax/torch).

A distribution is written as a short spec string so it can go on a command line and into a results
JSON unchanged:

    fixed:N                          every request gets exactly N tokens
    uniform:LO:HI                    integers uniform in [LO, HI] (both inclusive)
    lognormal:MEDIAN:SIGMA:LO:HI     round(exp(N(log MEDIAN, SIGMA))) clipped to [LO, HI]

The lognormal is the "ShareGPT-like" shape: most conversations are short, a few are very long.
Real ShareGPT (Llama tokenizer, as used by vLLM's benchmark_throughput) has prompts with median
~100-200 tokens and outputs with median ~150-250 and a tail past 1000; on a 2-core CPU we keep
the shape (sigma ~1, i.e. p90/median ~3.6) and scale the medians down. The long tail is what makes
static batching waste work: a static batch runs until its longest member is done.

Presets (SHAREGPT_PROMPT / SHAREGPT_OUTPUT) are the defaults of bench_throughput.py's
long-tailed workload.
"""

from __future__ import annotations

import dataclasses

import numpy as np

# ShareGPT-like, scaled down for a CPU: prompt median 64 (tail to 512), output median 48 (tail to 384).
SHAREGPT_PROMPT = "lognormal:64:0.8:8:512"
SHAREGPT_OUTPUT = "lognormal:48:1.0:4:384"


@dataclasses.dataclass(frozen=True)
class LengthDist:
    """A parsed length distribution; `sample(n, rng)` -> [n] int64 lengths >= 1."""

    kind: str  # "fixed" | "uniform" | "lognormal"
    args: tuple[float, ...]

    @classmethod
    def parse(cls, spec: str) -> "LengthDist":
        """Parse 'fixed:N', 'uniform:LO:HI' or 'lognormal:MEDIAN:SIGMA:LO:HI' (ValueError if malformed)."""
        if spec == "sharegpt-prompt":
            spec = SHAREGPT_PROMPT
        elif spec == "sharegpt-output":
            spec = SHAREGPT_OUTPUT
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


@dataclasses.dataclass
class Workload:
    """N requests: token-id prompts and exact output lengths (the benchmark sets ignore_eos)."""

    prompts: list[list[int]]  # N prompts of token ids
    output_lens: list[int]  # [N]
    prompt_dist: str
    output_dist: str
    seed: int

    @property
    def num_requests(self) -> int:
        return len(self.prompts)

    @property
    def prompt_lens(self) -> list[int]:
        return [len(p) for p in self.prompts]

    def summary(self) -> dict:
        """Length statistics for the results JSON."""
        def stats(x):
            x = np.asarray(x)
            return {"mean": float(x.mean()), "median": float(np.median(x)), "p90": float(np.percentile(x, 90)),
                    "min": int(x.min()), "max": int(x.max()), "total": int(x.sum())}

        return {"num_requests": self.num_requests, "prompt_dist": self.prompt_dist,
                "output_dist": self.output_dist, "seed": self.seed,
                "prompt_len": stats(self.prompt_lens), "output_len": stats(self.output_lens)}


def make_workload(num_requests: int, prompt_dist: str, output_dist: str, vocab_size: int,
                  seed: int = 0, avoid_ids: tuple[int, ...] = (0, 1, 2)) -> Workload:
    """Sample N requests. Prompt tokens are uniform random ids (the model is random-init, so content
    does not matter); `avoid_ids` keeps special ids (pad/bos/eos of Llama) out of prompts."""
    rng = np.random.default_rng(seed)
    pd, od = LengthDist.parse(prompt_dist), LengthDist.parse(output_dist)
    p_lens, o_lens = pd.sample(num_requests, rng), od.sample(num_requests, rng)
    lo = max(avoid_ids) + 1 if avoid_ids else 0
    prompts = [rng.integers(lo, vocab_size, size=int(n)).tolist() for n in p_lens]
    return Workload(prompts, [int(x) for x in o_lens], str(pd), str(od), seed)
