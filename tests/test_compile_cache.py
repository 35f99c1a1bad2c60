"""JAX's persistent compilation cache across processes (jaxllm/runner/compile_cache.py).

Each engine runs in a fresh subprocess, as a second `python` would: the first process compiles
and fills a temporary cache directory, the second loads every step executable from it and
compiles nothing (counted: jax fires backend_compile_duration for a load too, and cache_hits for
a load only). Tokens are the same either way. The off switch changes nothing in JAX's config.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_SCRIPT = r"""
import json, sys
import jax
from jaxllm import LLM, SamplingParams
from jaxllm.runner.sampling_inputs import GREEDY

model, cache_dir = sys.argv[1], sys.argv[2]
cache_dir = None if cache_dir == "off" else cache_dir
llm = LLM(model, num_kv_blocks=64, max_num_seqs=4, max_num_batched_tokens=16, token_buckets=(8, 16),
          skip_tokenizer_init=True, compile_cache_dir=cache_dir)
llm.engine.warmup(step_variants=((GREEDY, False),))
out = llm.generate([{"prompt_token_ids": [5, 6, 7, 8, 9, 10, 11, 12, 13, 14]}],
                   SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True), use_tqdm=False)
stats = llm.get_stats()
print(json.dumps({"compilations": stats["num_compilations"], "hits": stats["num_compile_cache_hits"],
                  "tokens": list(out[0].outputs[0].token_ids),
                  "jax_cache_dir": jax.config.jax_compilation_cache_dir or None}))
"""


def _run(model: str, cache_dir: str) -> dict:
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, model, cache_dir], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_second_process_compiles_nothing(tiny_model_dir, tmp_path):
    model = tiny_model_dir("llama")
    cache = str(tmp_path / "jax_cache")
    first = _run(model, cache)
    assert first["hits"] == 0 and first["compilations"] >= 2  # both buckets compiled here
    assert first["jax_cache_dir"] == cache and os.listdir(cache)
    second = _run(model, cache)
    assert second["compilations"] == second["hits"] >= 2  # every executable came from the cache
    assert second["tokens"] == first["tokens"]


def test_cache_off_changes_nothing():
    """compile_cache_dir=None neither enables JAX's cache nor replaces one already set."""
    import jax

    from jaxllm.runner import compile_cache

    before = jax.config.jax_compilation_cache_dir
    assert compile_cache.enable(None) == (before or None)
    assert jax.config.jax_compilation_cache_dir == before


def test_bad_compile_cache_dir():
    import pytest

    from jaxllm.config import EngineConfig

    with pytest.raises(ValueError, match="compile_cache_dir"):
        EngineConfig(model="m", compile_cache_dir=3)
