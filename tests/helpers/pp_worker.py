"""Pipeline-parallel scenarios run in a fresh process with 8 fake CPU devices (see
test_pipeline_parallel.py; same reasons as tp_worker.py). Each writes its findings as JSON.

    python tests/helpers/pp_worker.py engine MODEL_DIR OUT.json "1x1,2x1,2x4:1+3,2x2/swap"   (PxT[:partition][/swap|/overlap|/pallas|/invariant])
    JAXLLM_COORDINATOR=127.0.0.1:PORT JAXLLM_NUM_PROCESSES=2 JAXLLM_PROCESS_ID=i \\
        python tests/helpers/pp_worker.py multihost MODEL_DIR OUT.json           (2 devices per process)
    python tests/helpers/pp_worker.py export MODEL_DIR OUT.json     (Pallas tick exported for cuda)
    python tests/helpers/pp_worker.py copies MODEL_DIR OUT.json 2x1,2x2 [MODEL_DIR2 2x2 ...]   (KV copies per tick)
"""

from __future__ import annotations

import json
import os
import sys

MODE = sys.argv[1] if len(sys.argv) > 1 else ""
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={2 if MODE == 'multihost' else 8}"
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

# Seven requests, a 32-token budget and a 9-block cache (8 tokens each, 8 usable = 64 tokens
# for ~190 tokens of work): prompts are chunked, prefills mix with decodes, requests are
# preempted (recompute), and requests 4-6 share a 16-token prefix (prefix-cache hits). With P
# stages the batch queue keeps up to P of these batches in flight.
PROMPT_LENS = (3, 21, 38, 30, 20, 24, 18)
MAX_TOKENS = (4, 3, 4, 4, 3, 2, 4)
VOCAB = 512
TOP = 5


def _llm(model_dir, pp, tp, partition=None, **kw):
    from jaxllm import LLM

    return LLM(model_dir, pipeline_parallel_size=pp, tensor_parallel_size=tp, pipeline_layer_partition=partition,
               skip_tokenizer_init=True, block_size=8, num_kv_blocks=9, max_num_seqs=6,
               max_num_batched_tokens=32, token_buckets=(32,), **kw)


def _generate(llm, only: int | None = None):
    """The workload's tokens and top-TOP logprobs; only=i: request i alone."""
    from jaxllm import SamplingParams
    from tests.helpers.tiny_models import random_prompt

    shared = random_prompt(16, VOCAB, seed=100)
    prompts = [random_prompt(n, VOCAB, seed=i) for i, n in enumerate(PROMPT_LENS)]
    prompts = [p if i < 4 else shared + p[16:] for i, p in enumerate(prompts)]
    params = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True, logprobs=TOP) for m in MAX_TOKENS]
    # Seeded sampling and penalties run on the last stage too.
    params[2] = SamplingParams(temperature=0.7, top_k=20, seed=11, max_tokens=MAX_TOKENS[2], ignore_eos=True,
                               logprobs=TOP)
    params[3] = SamplingParams(temperature=0.0, repetition_penalty=1.4, min_tokens=2, max_tokens=MAX_TOKENS[3],
                               logprobs=TOP)
    if only is not None:
        prompts, params = [prompts[only]], [params[only]]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    tokens = [o.outputs[0].token_ids for o in outs]
    # Every step's top-TOP logprobs by token id (log-softmax of the logits).
    logprobs = [[{str(k): float(v.logprob) for k, v in step.items()} for step in o.outputs[0].logprobs] for o in outs]
    return tokens, logprobs


def _device_bytes(tree, device) -> int:
    import jax

    return sum(s.data.nbytes for x in jax.tree.leaves(tree) for s in x.addressable_shards if s.device == device)


def _run(model_dir, pp, tp, partition=None, mode="recompute"):
    import jax
    import numpy as np

    # Swap mode: a host pool of up to max_num_seqs requests' blocks (config.resolve caps it).
    # Overlap mode: the host reads each tick's tokens after dispatching the next tick.
    extra = {"swap": dict(preemption_mode="swap", swap_space=0.01),
             "overlap": dict(pipeline_overlap_host=True), "pallas": dict(attention_backend="pallas"),
             "invariant": dict(batch_invariant=True), "recompute": {}}[mode]
    llm = _llm(model_dir, pp, tp, partition, **extra)
    tokens, logprobs = _generate(llm)
    eng = llm.engine
    stats = eng.get_stats()
    run = {"tokens": tokens, "logprobs": logprobs, "num_preemptions": stats["num_preemptions"],
           "prefix_cache_hits": stats["prefix_cache_hits"], "num_compilations": stats["num_compilations"],
           **{k: stats[k] for k in ("num_cpu_blocks", "cpu_blocks_used", "kv_blocks_used", "num_swap_outs",
                                    "num_swap_ins", "num_blocks_swapped_out", "num_blocks_swapped_in",
                                    "num_swap_fallbacks")}}
    if mode == "invariant":  # each request again, alone in the engine
        alone = [_generate(llm, only=i) for i in range(len(PROMPT_LENS))]
        run["alone_tokens"] = [t[0] for t, _ in alone]
        run["alone_logprobs"] = [lp[0] for _, lp in alone]
    if pp > 1:
        runner = eng.runner
        total_params = sum(np.asarray(x).nbytes for x in jax.tree.leaves(eng.model.params))
        cfg = eng.model.config
        total_kv = 2 * cfg.num_layers * 9 * 8 * cfg.num_kv_heads * cfg.head_dim * 4
        devices = list(runner.mesh.devices.flat)
        run["param_bytes_ratio"] = [_device_bytes(runner.params, d) / total_params for d in devices]
        run["kv_bytes_ratio"] = [_device_bytes(runner.kv_caches, d) / total_kv for d in devices]
        run["table_bytes_ratio"] = float(np.asarray(eng.model.params["embed"]).nbytes / total_params)
        run["counts"] = list(runner.plan.counts)
        run["k_cache_spec"] = str(runner.kv_caches[0][0].sharding.spec)
        run["queue"] = eng.batch_queue.stats()
        if mode == "swap":
            run.update(_swap_round_trip(runner))
        # A padding slot's KV is never the model's: slot 1 on the stage of 1 layer stays zero.
        run["stage_kv_nonzero"] = [[bool(np.abs(np.asarray(s.data)).sum() > 0)
                                    for s in sorted(k.addressable_shards, key=lambda s: s.device.id)
                                    if s.replica_id == 0]
                                   for k, _ in runner.kv_caches]
    return run


def _swap_round_trip(runner) -> dict:
    """Random K/V (distinct per stage, slot and head) through the pipeline runner's swap copies:
    device blocks 1..3 out to host blocks 5..7, back into device blocks 4..6. Exact on every
    stage, and each device's host shard is its own stage's slots and heads only."""
    import jax
    import numpy as np

    rng = np.random.default_rng(0)
    shape = runner.kv_caches[0][0].shape
    before = [tuple(rng.standard_normal(shape).astype(np.float32) for _ in range(2)) for _ in runner.kv_caches]
    runner.kv_caches = [tuple(jax.device_put(a, runner._kv_sharding) for a in layer) for layer in before]
    runner.swap([(1, 5), (2, 6), (3, 7)], [])
    runner.swap([], [(5, 4), (6, 5), (7, 6)])
    exact = all(np.array_equal(np.asarray(got)[4:7], want[1:4]) and np.array_equal(np.asarray(h)[5:8], want[1:4])
                for layer, host, ref in zip(runner.kv_caches, runner.host_caches, before)
                for got, h, want in zip(layer, host, ref))
    pool = runner.host_caches[0][0]
    return {"swap_round_trip_exact": exact, "host_pool_memory_kind": pool.sharding.memory_kind,
            "host_pool_shape": list(pool.shape), "host_pool_shard_shape": list(pool.addressable_shards[0].data.shape),
            "host_pool_spec": str(pool.sharding.spec)}


def _layout(spec: str):
    """(pp, tp, partition) of "PxT[:partition]", e.g. "2x4:1+3" -> (2, 4, (1, 3))."""
    shape, _, part = spec.partition(":")
    pp, tp = (int(x) for x in shape.split("x"))
    return pp, tp, tuple(int(x) for x in part.split("+")) if part else None


def engine(model_dir, out_path, configs):
    result = {}
    for c in configs.split(","):
        spec, _, mode = c.partition("/")  # "2x1/swap": swap preemption; "/overlap": host overlap
        result[c] = _run(model_dir, *_layout(spec), mode or "recompute")
    with open(out_path, "w") as f:
        json.dump(result, f)


def multihost(model_dir, out_path):
    from jaxllm.parallel import distributed

    distributed.initialize()  # JAXLLM_* from the environment
    import jax

    # Stage 0 on process 0's two devices, stage 1 on process 1's; swap preemption, so each
    # process builds only its own stage's host pool.
    llm = _llm(model_dir, 2, 2, preemption_mode="swap", swap_space=0.01)
    tokens, logprobs = _generate(llm)
    mesh = llm.engine.runner.mesh
    pool = llm.engine.runner.host_caches[0][0]
    with open(out_path, "w") as f:
        json.dump({"process_index": jax.process_index(), "process_count": jax.process_count(),
                   "stage_processes": [sorted({d.process_index for d in row}) for row in mesh.devices],
                   "tokens": tokens, "logprobs": logprobs, "num_swap_outs": llm.get_stats()["num_swap_outs"],
                   "host_pool_local_shards": [[d.id for d in s.data.devices()] for s in pool.addressable_shards]}, f)
    distributed.shutdown()


def _tick_call(llm):
    """(jitted tick, args, static kwargs) of a one-request tick at stage 0, captured without running it."""
    from jaxllm import SamplingParams
    from tests.helpers.tiny_models import random_prompt

    eng, runner = llm.engine, llm.engine.runner
    eng.add_request("probe", {"prompt_token_ids": random_prompt(11, VOCAB, seed=1)}, SamplingParams(max_tokens=2))
    step = eng.build_step_inputs(eng.scheduler.schedule().scheduled)
    tick, captured = runner._jitted, {}

    def capture(*args, **kwargs):  # the tick's exact arguments
        captured.update(args=args, kwargs=kwargs)
        raise StopIteration

    runner._jitted = capture
    try:
        runner.dispatch_tick([step] + [None] * (runner.plan.num_stages - 1))
    except StopIteration:
        pass
    finally:
        runner._jitted = tick
    return tick, captured["args"], captured["kwargs"]


def _kv_cache_copies(llm) -> int:
    """Copies of a whole KV-cache shard in the compiled tick, whatever shape XLA gives the copy
    (a reshape or transpose of the cache shows up as a copy of as many elements): a cache updated
    inside a conditional, or reshaped around its write, would be copied every tick."""
    import math
    import re

    tick, args, kwargs = _tick_call(llm)
    k = llm.engine.runner.kv_caches[0][0]
    size = math.prod(k.sharding.shard_shape(k.shape))
    copies = re.findall(r"= \w+\[([\d,]*)\]\S* copy\(", tick.lower(*args, **kwargs).compile().as_text())
    return sum(math.prod(int(d) for d in dims.split(",") if d) == size for dims in copies)


def copies(model_dir, out_path, configs, *more):
    """Whole-KV-cache copies in the compiled tick per config ("PxT[:partition]") of each model
    (MODEL_DIR CONFIGS pairs), keyed "DIRNAME/config": an LLM built, its tick compiled, nothing run."""
    result = {}
    pairs = [(model_dir, configs)] + list(zip(more[::2], more[1::2]))
    for path, names in pairs:
        for c in names.split(","):
            result[f"{os.path.basename(path)}/{c}"] = _kv_cache_copies(_llm(path, *_layout(c)))
    with open(out_path, "w") as f:
        json.dump(result, f)


def export(model_dir, out_path):
    """The P=2 x T=2 tick with the Pallas backend (bf16, head_dim 64) exported for cuda: does its
    module hold the Mosaic GPU kernel? (TPU export needs a TPU device kind in the tick's mesh,
    which CPU devices cannot give.)"""
    import functools

    import jax

    llm = _llm(model_dir, 2, 2, attention_backend="pallas", dtype="bfloat16")
    tick, args, kwargs = _tick_call(llm)
    exported = jax.export.export(jax.jit(functools.partial(tick, **kwargs)), platforms=["cuda"])
    text = exported(*args).mlir_module()
    with open(out_path, "w") as f:
        # stablehlo.case: lax.switch's per-stage layer variants (a model whose layers differ).
        json.dump({"mosaic_gpu": "mosaic_gpu" in text, "layer_switch": "stablehlo.case" in text}, f)


if __name__ == "__main__":
    {"engine": engine, "multihost": multihost, "export": export, "copies": copies}[MODE](*sys.argv[2:])
