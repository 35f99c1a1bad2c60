"""Per-phase start-up times of one process, less load-sensitive than startup_time.py's totals:
importing jax, importing jaxllm's loader, and load_model("smollm2-135m-instruct") to device
(weights ready), and whether transformers / torch got imported on the way. One JSON line.

    python experiments/startup_phases.py
"""
import time, sys, json
t0 = time.perf_counter()
import jax, jax.numpy as jnp  # noqa
t1 = time.perf_counter()
from jaxllm.models.loader import load_model
t2 = time.perf_counter()
m = load_model("smollm2-135m-instruct", dtype="float32")
jax.block_until_ready(jax.tree.leaves(m.params))
t3 = time.perf_counter()
print(json.dumps({"src": __import__("jaxllm").__file__, "import_jax_s": t1 - t0, "import_loader_s": t2 - t1,
                  "load_model_s": t3 - t2, "transformers_imported": "transformers" in sys.modules,
                  "torch_imported": "torch" in sys.modules}))
