"""House rule 1: host code (scheduler, KV-cache manager, batch preparation, request intake and
outputs) never imports jax, not even transitively. Checked in a fresh interpreter."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOST_MODULES = [
    "jaxllm",  # the package itself imports jax lazily (load_model / Model on first use)
    "jaxllm.config",
    "jaxllm.request",
    "jaxllm.core.kv_cache",
    "jaxllm.core.kv_cache.block_pool",
    "jaxllm.core.kv_cache.block_table",
    "jaxllm.core.kv_cache.hashing",
    "jaxllm.core.kv_cache.manager",
    "jaxllm.core.scheduler",
    "jaxllm.core.policies",
    "jaxllm.core.batch_queue",
    "jaxllm.pipeline_step",
    "jaxllm.async_scheduling",
    "jaxllm.runner.batch",
    "jaxllm.runner.sampling_inputs",
    "jaxllm.runner.instrument_inputs",
    "jaxllm.runner.step_io",
    "jaxllm.sampling_params",
    "jaxllm.inputs",
    "jaxllm.outputs",
    "jaxllm.detokenizer",
    "jaxllm.engine",
    "jaxllm.llm",
    "jaxllm.observers",
    "jaxllm.beam_search",
    "jaxllm.sim",  # the simulator (jaxllm.sim.fit, the optax fit, is the one part that imports jax)
    "jaxllm.sim.engine",
    "jaxllm.sim.cost_model",
    "jaxllm.sim.hardware",
    "jaxllm.sim.replay",
    "jaxllm.bench.systems.sim",
]


def test_host_modules_do_not_import_jax():
    code = (
        "import sys\n"
        f"for m in {HOST_MODULES!r}: __import__(m)\n"
        "bad = sorted(m for m in sys.modules if m == 'jax' or m.startswith('jax.'))\n"
        "assert not bad, bad[:5]\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
