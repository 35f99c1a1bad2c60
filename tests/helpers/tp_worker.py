"""Tensor-parallel checks run in a fresh process with 8 fake CPU devices (see test_tensor_parallel.py).

jax fixes the CPU device count when its backend starts, and pytest has usually started it (with
one device) by the time a TP test runs; so each scenario runs here, in a subprocess whose
XLA_FLAGS are set before jax is imported, and writes its findings as JSON.

    python tests/helpers/tp_worker.py engine MODEL_DIR OUT.json
    python tests/helpers/tp_worker.py orbax MODEL_DIR CKPT_DIR OUT.json
    python tests/helpers/tp_worker.py pallas OUT.json
    python tests/helpers/tp_worker.py invariant MODEL_DIR OUT.json [BACKEND [BATCH_INVARIANT]]
    JAXLLM_COORDINATOR=127.0.0.1:PORT JAXLLM_NUM_PROCESSES=2 JAXLLM_PROCESS_ID=i \\
        python tests/helpers/tp_worker.py multihost MODEL_DIR OUT.json   (2 devices per process)
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

# A mixed workload: with a 64-token budget, step 1 prefills three prompts and the first chunk of
# the fourth; later steps mix that prompt's remaining chunk with decodes.
PROMPT_LENS = (3, 21, 38, 30)
MAX_TOKENS = (6, 4, 5, 5)
VOCAB = 512


def _llm(model_dir, tp):
    from jaxllm import LLM

    return LLM(model_dir, tensor_parallel_size=tp, skip_tokenizer_init=True, block_size=8, num_kv_blocks=40,
               max_num_seqs=4, max_num_batched_tokens=64, token_buckets=(64,))


def _generate(llm):
    from jaxllm import SamplingParams
    from tests.helpers.tiny_models import random_prompt

    prompts = [{"prompt_token_ids": random_prompt(n, VOCAB, seed=i)} for i, n in enumerate(PROMPT_LENS)]
    params = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True, logprobs=1) for m in MAX_TOKENS]
    # The general sampler's features under a vocabulary-sharded LM head: a seeded top-k/min-p row
    # and a penalised row with min_tokens (both still report logprobs for the comparison).
    params[2] = SamplingParams(temperature=0.7, top_k=20, min_p=0.02, seed=11, max_tokens=MAX_TOKENS[2],
                               ignore_eos=True, logprobs=1)
    params[3] = SamplingParams(temperature=0.0, repetition_penalty=1.4, frequency_penalty=0.3, min_tokens=2,
                               max_tokens=MAX_TOKENS[3], logprobs=1)
    outs = llm.generate(prompts, params, use_tqdm=False)
    tokens = [o.outputs[0].token_ids for o in outs]
    logprobs = [[float(step[t].logprob) for step, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)] for o in outs]
    return tokens, logprobs


def _shard_bytes(arr, device) -> int:
    return sum(s.data.nbytes for s in arr.addressable_shards if s.device == device)


def engine(model_dir, out_path):
    import jax
    import numpy as np
    from jax.sharding import NamedSharding

    from jaxllm.models import weights
    from jaxllm.models.loader import load_model
    from jaxllm.parallel import kv_head_replicas, partition_spec

    canonical = load_model(model_dir)
    cfg = canonical.config
    ref_logits = None
    prompt = np.arange(3, 40, dtype=np.int32)
    result = {"num_devices": jax.device_count(), "runs": {}}
    for tp in (1, 2, 4):
        llm = _llm(model_dir, tp)
        tokens, logprobs = _generate(llm)
        run = {"tokens": tokens, "logprobs": logprobs}
        runner = llm.engine.runner
        if tp > 1:
            mesh = runner.mesh
            specs = weights.param_specs(runner.config)
            mism = []
            for (path, leaf), spec in zip(jax.tree_util.tree_leaves_with_path(runner.params),
                                          jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, weights.ParamSpec))):
                want = NamedSharding(mesh, partition_spec(spec, mesh))
                if not leaf.sharding.is_equivalent_to(want, leaf.ndim) or leaf.shape != spec.shape:
                    mism.append(f"{jax.tree_util.keystr(path)}: {leaf.sharding} != {want}")
            run["sharding_mismatches"] = mism
            run["specs_sample"] = {
                k: str(runner.params["layers"][0][k].sharding.spec)
                for k in ("q_proj", "k_proj", "o_proj", "gate_proj", "down_proj", "attn_norm")
            } | {"embed": str(runner.params["embed"].sharding.spec), "lm_head": str(runner.params["lm_head"].sharding.spec)}
            total = sum(x.nbytes for x in jax.tree.leaves(canonical.params))
            run["param_bytes_ratio"] = [
                sum(_shard_bytes(x, d) for x in jax.tree.leaves(runner.params)) / total for d in mesh.devices.flat
            ]
            # KV cache: shape/sharding, and which original KV head each device holds.
            k_cache = runner.kv_caches[0][0]
            r = kv_head_replicas(cfg, tp)
            run["kv_cache"] = {
                "global_shape": list(k_cache.shape),
                "spec": str(k_cache.sharding.spec),
                "shard_shapes": [list(s.data.shape) for s in k_cache.addressable_shards],
                "replicas": r,
            }
            d = cfg.head_dim
            k_full = np.asarray(canonical.params["layers"][0]["k_proj"])  # [H, nKV*D]
            shards = sorted(runner.params["layers"][0]["k_proj"].addressable_shards, key=lambda s: s.device.id)
            heads_per_dev = max(1, cfg.num_kv_heads // tp)
            ok = []
            for i, s in enumerate(shards):  # device i holds original heads [i*hpd, ...) // r
                first = (i * heads_per_dev) // r if r > 1 else i * heads_per_dev
                want = k_full[:, first * d:(first + heads_per_dev) * d]
                ok.append(bool(np.array_equal(np.asarray(s.data), want)))
            run["k_proj_heads_ok"] = ok
            cache_shards = [np.asarray(s.data) for s in sorted(k_cache.addressable_shards, key=lambda s: s.device.id)]
            run["cache_shard_equal_to_dev0"] = [bool(np.array_equal(c, cache_shards[0])) for c in cache_shards]
            run["cache_nonzero"] = bool(np.abs(cache_shards[0]).sum() > 0)
        logits = np.asarray(llm.engine.model.forward(prompt))
        if ref_logits is None:
            ref_logits = logits
        run["max_logit_diff_vs_tp1"] = float(np.max(np.abs(logits - ref_logits)))
        result["runs"][str(tp)] = run
    with open(out_path, "w") as f:
        json.dump(result, f)


def orbax(model_dir, ckpt_dir, out_path):
    import numpy as np

    from jaxllm.models.loader import load_model
    from jaxllm.parallel import make_mesh
    from jaxllm.parallel.params import expand_kv_heads, load_sharded, restore_sharded

    canonical = load_model(model_dir)
    prompt = np.arange(3, 30, dtype=np.int32)
    ref = np.asarray(canonical.forward(prompt))
    saved = load_sharded(model_dir, "float32", make_mesh(2))
    saved.save(ckpt_dir)
    result = {"saved_k_proj_spec": str(saved.params["layers"][0]["k_proj"].sharding.spec)}
    for tp in (4, 1):
        m = restore_sharded(ckpt_dir, make_mesh(tp))
        kp = m.params["layers"][0]["k_proj"]
        r = m.config.num_kv_heads // canonical.config.num_kv_heads
        want_k = expand_kv_heads(np.asarray(canonical.params["layers"][0]["k_proj"]), 1, canonical.config.head_dim, r)
        result[str(tp)] = {
            "num_devices": len(kp.sharding.device_set),
            "k_proj_spec": str(kp.sharding.spec),
            "embed_spec": str(m.params["embed"].sharding.spec),
            "down_spec": str(m.params["layers"][1]["down_proj"].sharding.spec),
            "k_proj_equal": bool(np.array_equal(np.asarray(kp), want_k)),
            "q_proj_equal": bool(np.array_equal(np.asarray(m.params["layers"][1]["q_proj"]),
                                                np.asarray(canonical.params["layers"][1]["q_proj"]))),
            "max_logit_diff": float(np.max(np.abs(np.asarray(m.forward(prompt)) - ref))),
        }
    with open(out_path, "w") as f:
        json.dump(result, f)


def multihost(model_dir, out_path):
    from jaxllm.parallel import distributed

    distributed.initialize()  # JAXLLM_* from the environment
    import jax

    llm = _llm(model_dir, jax.device_count())
    tokens, logprobs = _generate(llm)
    with open(out_path, "w") as f:
        json.dump({"process_index": jax.process_index(), "process_count": jax.process_count(),
                   "device_count": jax.device_count(), "local_devices": jax.local_device_count(),
                   "tokens": tokens, "logprobs": logprobs, "main": distributed.is_main_process()}, f)
    distributed.shutdown()


def pallas(out_path):
    """shard_map-wrapped Pallas kernel (interpret mode on CPU) vs the unsharded jnp reference, with
    KV heads split (tp=2) and replicated (tp=4: 2 KV heads expanded as the engine does)."""
    import jax
    import numpy as np

    from jaxllm.attention import pallas as pallas_attention
    from jaxllm.attention.reference import ragged_paged_attention as reference
    from jaxllm.parallel import kv_cache_sharding, make_mesh
    from jaxllm.parallel.attention import shard_map_attention
    from tests.attention_cases import make_case

    case = make_case([(5, 12), (1, 9), (0, 0), (7, 7)], num_kv_heads=2, group=2, block_size=8, head_dim=16)
    want = np.asarray(reference(*case.args(), sm_scale=case.sm_scale))
    result = {}
    for tp in (2, 4):
        r = max(1, tp // 2)
        k, v = (np.repeat(c, r, axis=2) for c in (case.k_cache, case.v_cache))  # [h0,h0,h1,h1] at tp=4
        mesh = make_mesh(tp)
        k, v = (jax.device_put(c, kv_cache_sharding(mesh)) for c in (k, v))
        fn = jax.jit(shard_map_attention(pallas_attention.ragged_paged_attention, mesh),
                     static_argnames=("sm_scale", "sliding_window", "soft_cap"))
        got = fn(case.q, k, v, case.kv_lens, case.block_tables, case.cu_q_lens, sm_scale=case.sm_scale)
        t = int(case.cu_q_lens[-1])
        result[str(tp)] = {"max_diff": float(np.max(np.abs(np.asarray(got)[:t] - want[:t]))),
                           "out_spec": str(got.sharding.spec)}
    with open(out_path, "w") as f:
        json.dump(result, f)


def invariant(model_dir, out_path, backend="reference", batch_invariant="1"):
    """batch_invariant=True under tp=2: one request's tokens and top-5 logprobs alone,
    next to other requests (greedy and sampled), prefilled in 16-token chunks next to a decode,
    and its prompt's first two blocks from the prefix cache (the test compares them bitwise).
    backend: attention_backend; batch_invariant "0" runs the default mode (for comparison)."""
    from jaxllm import LLM, SamplingParams
    from tests.helpers.tiny_models import random_prompt

    target = {"prompt_token_ids": random_prompt(45, VOCAB, seed=100)}
    params = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True, logprobs=5)
    company = [{"prompt_token_ids": random_prompt(n, VOCAB, seed=n)} for n in (7, 30)]
    company_params = [SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True),
                      SamplingParams(temperature=0.9, seed=3, max_tokens=6, ignore_eos=True)]

    def record(llm, others=(), others_params=(), before=None):
        if before is not None:
            llm.generate([before], SamplingParams(temperature=0.0, max_tokens=1), use_tqdm=False)
        out = llm.generate(list(others) + [target], list(others_params) + [params], use_tqdm=False)[-1]
        comp = out.outputs[0]
        return {"tokens": comp.token_ids, "cached": out.num_cached_tokens,
                "logprobs": [sorted((t, e.logprob) for t, e in lp.items()) for lp in comp.logprobs]}

    def engine(budget, prefix_caching=False):
        # Buckets 16 and 64: the alone decode runs in a 16-token step, the company in 64.
        return LLM(model_dir, tensor_parallel_size=2, skip_tokenizer_init=True, block_size=8,
                   num_kv_blocks=40, max_num_seqs=4, max_num_batched_tokens=budget,
                   token_buckets=(16, 64), enable_prefix_caching=prefix_caching,
                   attention_backend=backend, batch_invariant=batch_invariant == "1")

    wide = engine(64)
    runs = {"alone": record(wide), "batched": record(wide, company, company_params)}
    runs["chunked"] = record(engine(16), company[:1], company_params[:1])
    runs["prefix_cached"] = record(engine(64, prefix_caching=True),
                                   before={"prompt_token_ids": target["prompt_token_ids"][:20]})
    with open(out_path, "w") as f:
        json.dump(runs, f)


if __name__ == "__main__":
    {"engine": engine, "orbax": orbax, "multihost": multihost, "pallas": pallas,
     "invariant": invariant}[MODE](*sys.argv[2:])
