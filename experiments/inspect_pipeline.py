"""Pipeline parallelism: per-device bytes, collectives per tick, the bubble of a long-tailed run,
and a cost model for real hardware.

    python experiments/inspect_pipeline.py                       # layout + HLO, ~125M Llama shape
    python experiments/inspect_pipeline.py --pp 2 4 --tp 1 2     # P x T grid (8 fake CPU devices)
    python experiments/inspect_pipeline.py --bubble              # + engine run, long-tailed workload
    python experiments/inspect_pipeline.py --bubble --overlap --hidden 512   # + host/device overlap
    python experiments/inspect_pipeline.py --link-gbs 12.5 --tflops 400   # cost model's hardware

1. Layout (nothing materialised): per-device parameter and KV bytes from the stage shardings
   (jaxllm/parallel/pipeline.py), against the ideal 1/(P*T).
2. Collectives per tick, counted in the compiled HLO of the jitted tick (abstract inputs):
   collective-permute = the stage-to-stage ppermute of [T, H]; all-reduce = tp's two per layer
   slot, the vocab-parallel embedding/LM head, and the psum over "pp" that brings the sampled
   tokens to every device.
3. --bubble: a tiny random model on P stages serves a long-tailed workload (experiments/
   workloads.py); the batch queue counts idle stage-ticks and why (core/batch_queue.py: fill,
   drain, in_flight, seats, kv_blocks; printed as fractions of all stage-ticks), batches the
   token budget capped are counted apart, and the run is compared with P=1 steps. --overlap runs
   each P again with ParallelConfig.pipeline_overlap_host and prints wall, host and device-call
   ms per tick of both (steady state: compiled first), and whether the tokens equal P=1's.
4. Cost model (CPU fake devices have no meaningful timings): per tick, each stage computes
   ~2 * T * (its parameters) flops and sends T * H * bytes to the next stage; tensor parallelism
   over the same link would instead all-reduce T * H * bytes twice per layer.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _ROOT)
sys.path.insert(0, os.path.join(_ROOT, "experiments"))


def _nbytes(shape, dtype) -> int:
    import numpy as np

    return int(np.prod(shape)) * np.dtype(dtype).itemsize


def layout_and_hlo(config, pp: int, tp: int, *, dtype="float32", num_tokens=64, num_seqs=8, num_blocks=512,
                   block_size=16, max_blocks=8) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P

    from inspect_sharding import count_collectives
    from jaxllm.attention.metadata import AttentionMetadata
    from jaxllm.attention.reference import ragged_paged_attention
    from jaxllm.models import weights
    from jaxllm.parallel import pipeline
    from jaxllm.parallel.pipeline_tick import StageInputs, pipeline_tick
    from jaxllm.parallel.rules import tp_model_config
    from jaxllm.runner.sampling_inputs import build_sampling_inputs
    from jaxllm.sampling_params import SamplingParams

    plan = pipeline.validate_pp(config, pp, tp)
    mesh = pipeline.make_pp_mesh(pp, tp)
    run_config = tp_model_config(config, tp)
    layout = pipeline.stage_layout(config, mesh, plan, dtype)
    leaves = jax.tree.leaves(layout)
    total = sum(_nbytes(a.shape, a.dtype) for a in jax.tree.leaves(weights.abstract_params(config, jnp.dtype(dtype))))
    per_device = sum(_nbytes(a.sharding.shard_shape(a.shape), a.dtype) for a in leaves)
    kv_sh = pipeline.kv_sharding(mesh)
    kv_shape = pipeline.kv_cache_shape(pp, num_blocks, block_size, run_config.num_kv_heads, run_config.head_dim)
    kv_abstract = [(jax.ShapeDtypeStruct(kv_shape, dtype, sharding=kv_sh),) * 2 for _ in range(plan.layers_per_stage)]
    kv_per_device = 2 * plan.layers_per_stage * _nbytes(kv_sh.shard_shape(kv_shape), dtype)
    kv_one_device = 2 * config.num_layers * _nbytes((num_blocks, block_size, config.num_kv_heads, config.head_dim), dtype)

    rep, stage = NamedSharding(mesh, P()), pipeline.stage_sharding(mesh)
    i32 = lambda sh, *s: jax.ShapeDtypeStruct(s, jnp.int32, sharding=sh)  # noqa: E731
    inputs = StageInputs(
        token_ids=i32(stage, pp, num_tokens), positions=i32(stage, pp, num_tokens),
        metadata=AttentionMetadata(slot_mapping=i32(stage, pp, num_tokens), block_tables=i32(stage, pp, num_seqs, max_blocks),
                                   kv_lens=i32(stage, pp, num_seqs), cu_q_lens=i32(stage, pp, num_seqs + 1)))
    rows = [(SamplingParams(temperature=0.0), 0, [1], [], [2])] * num_seqs
    sampling, sampler = build_sampling_inputs(rows, num_seqs, vocab_size=config.vocab_size, history_width=0)
    sampling = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype, sharding=rep), sampling)
    carry = jax.ShapeDtypeStruct((pp, num_tokens, config.hidden_size), dtype, sharding=pipeline.carry_sharding(mesh))

    def tick(params, kv, carry, inputs, logits_indices, sampling, targets):
        return pipeline_tick(params, kv, carry, inputs, logits_indices, sampling, targets, config=run_config,
                             plan=plan, attention_fn=ragged_paged_attention, sampler=sampler,
                             prompt_logprobs=False, mesh=mesh)

    compiled = jax.jit(tick, donate_argnums=(1, 2)).lower(
        layout, kv_abstract, carry, inputs, i32(rep, num_seqs), sampling, i32(rep, num_tokens)).compile()
    return {"pp": pp, "tp": tp, "counts": plan.counts, "param_bytes_total": total,
            "param_bytes_per_device": per_device, "kv_bytes_per_device": kv_per_device,
            "kv_bytes_one_device": kv_one_device, "collectives": count_collectives(compiled.as_text())}


def cost_model(config, pp: int, tp: int, *, tokens: int, dtype_bytes: int, tflops: float, link_gbs: float) -> dict:
    """Per tick, seconds: one stage's matmul compute vs sending its activations to the next stage
    over `link_gbs`, and what tensor parallelism over the same link would spend on all-reduces
    (2 per layer, ring: 2 (n - 1) / n of T * H bytes each way) for the same P * T devices."""
    h, i, v = config.hidden_size, config.intermediate_size, config.vocab_size
    d, nh, nkv = config.head_dim, config.num_heads, config.num_kv_heads
    layer_params = h * nh * d * 2 + h * nkv * d * 2 + 3 * h * i
    layers_per_stage = -(-config.num_layers // pp)
    flops = 2 * tokens * layers_per_stage * layer_params / tp
    compute_s = flops / (tflops * 1e12)
    act_bytes = tokens * h * dtype_bytes
    transfer_s = act_bytes / (link_gbs * 1e9)
    n = pp * tp
    tp_allreduce_bytes = 2 * config.num_layers * act_bytes * 2 * (n - 1) / n
    # Tensor parallelism over all P*T devices: the whole model's layers per step, over the link.
    tp_step_s = 2 * tokens * config.num_layers * layer_params / n / (tflops * 1e12) + tp_allreduce_bytes / (link_gbs * 1e9)
    return {"compute_s": compute_s, "transfer_s": transfer_s, "activation_bytes": act_bytes,
            "pp_step_s": pp * max(compute_s, transfer_s), "tp_step_s": tp_step_s,
            "lm_head_s": 2 * tokens * h * v / tp / (tflops * 1e12)}


def bubble_run(pp: int, num_requests: int, seed: int = 0, **engine_kw) -> dict:
    """Serve a long-tailed workload on a tiny random model with P stages (P=1: the baseline)."""
    import numpy as np

    from workloads import LengthDist

    rng = np.random.default_rng(seed)
    prompt_lens = LengthDist.parse("lognormal:24:0.8:4:128").sample(num_requests, rng)
    output_lens = LengthDist.parse("lognormal:12:1.0:2:96").sample(num_requests, rng)
    return serve_run(pp, prompt_lens, output_lens, seed=seed, **engine_kw)


def overlap_bench(pp: int, overlap: bool, hidden: int, num_requests: int = 40, seed: int = 0) -> dict:
    """Host time hidden by overlap, on ticks of equal work: decode-bound requests (4-token prompts,
    48 outputs) under an 8-token budget with enough requests outside the pipeline that, overlap
    or not, nearly every tick runs a full 8-row batch; the wall per tick then differs only by
    the host time the overlap hides."""
    import numpy as np

    lens = np.full(num_requests, 4), np.full(num_requests, 48)
    return serve_run(pp, *lens, seed=seed, overlap=overlap, hidden=hidden, num_kv_blocks=4 * num_requests + 1,
                     budget=8, buckets=(8,), seats=num_requests)


def serve_run(pp: int, prompt_lens, output_lens, seed: int = 0, overlap: bool = False, hidden: int = 64,
              num_kv_blocks: int = 129, budget: int = 64, buckets=(32, 64), seats: int = 16) -> dict:
    """Serve greedy requests of these prompt / output lengths on a random 4-layer model.

    Compiled before timing (warmup), so wall_s and the per-tick host / device times are steady
    state: host_ms is each step's time outside device calls (scheduling, batch preparation,
    outputs), device_ms the time in them (dispatch, swaps and waiting for the tokens). With
    `overlap` the wait is for the previous tick, dispatched a step earlier."""
    import time

    import jax
    import numpy as np
    from jaxllm.runner.step_io import STEP_VARIANTS

    from jaxllm.config import CacheConfig, EngineConfig, ParallelConfig, SchedulerConfig
    from jaxllm.engine import Engine
    from jaxllm.model import Model
    from jaxllm.models import weights
    from jaxllm.sampling_params import SamplingParams

    config = _tiny_config(hidden)
    params = weights.init_params(config, jax.random.PRNGKey(seed))  # the pipeline places them per stage
    model = Model(config=config, params=params, dtype="float32")
    engine = Engine(EngineConfig(
        model="random-tiny", skip_tokenizer_init=True, token_buckets=buckets,
        cache=CacheConfig(block_size=16, num_kv_blocks=num_kv_blocks),
        scheduler=SchedulerConfig(max_num_seqs=seats, max_num_batched_tokens=budget),
        parallel=ParallelConfig(pipeline_parallel_size=pp, pipeline_overlap_host=overlap)), model=model)
    engine.warmup(STEP_VARIANTS[:1])  # greedy only: the workload's one variant
    records = []
    engine.add_step_observer(records.append)
    rng = np.random.default_rng(seed)
    for k, (n, m) in enumerate(zip(prompt_lens, output_lens)):
        engine.add_request(str(k), {"prompt_token_ids": rng.integers(3, config.vocab_size, int(n)).tolist()},
                           SamplingParams(temperature=0.0, max_tokens=int(m), ignore_eos=True))
    steps, tokens = 0, {}
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        for o in engine.step():
            tokens[o.request_id] = list(o.outputs[0].token_ids)
        steps += 1
    wall = time.perf_counter() - start
    batches = [r for r in records if r.num_scheduled_requests]
    out = {"pp": pp, "overlap": overlap, "steps": steps, "wall_s": wall,
           "host_ms": 1e3 * sum(r.host_time for r in records) / steps,
           "device_ms": 1e3 * sum(r.device_time for r in records) / steps,
           "output_tokens": int(output_lens.sum()), "max_output": int(output_lens.max()),
           # Batches the token budget capped (the only way it shapes the bubble: fuller batches
           # leave fewer requests for the next one); they are never empty.
           "budget_full_batches": sum(r.num_batched_tokens >= budget for r in batches), "batches": len(batches),
           "num_preemptions": engine.scheduler.num_preemptions, "tokens": tokens}
    if engine.batch_queue is not None:
        out.update(engine.batch_queue.stats())
    return out


def _tiny_config(hidden: int = 64):
    from jaxllm.models.model_config import ModelConfig, RopeConfig

    return ModelConfig(
        architecture="LlamaForCausalLM", vocab_size=512, hidden_size=hidden, intermediate_size=2 * hidden,
        num_layers=4, num_heads=4, num_kv_heads=2, head_dim=hidden // 4, rms_norm_eps=1e-6, rope=RopeConfig(),
        max_position_embeddings=512, tie_word_embeddings=False, attention_bias=False, qk_norm=False,
        layer_sliding_windows=(None,) * 4)


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _per_step(r: dict) -> str:
    """Wall, host and device-call ms per engine step (= per tick under PP)."""
    return (f"{1e3 * r['wall_s'] / r['steps']:.2f} ms wall = host {r['host_ms']:.2f} + device calls "
            f"{r['device_ms']:.2f} ms")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pp", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--model", default=None, help="HF checkpoint dir (only config.json is read)")
    ap.add_argument("--num-kv-heads", type=int, default=None)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--bubble", action="store_true", help="also run the engine on a long-tailed workload")
    ap.add_argument("--num-requests", type=int, default=24)
    ap.add_argument("--overlap", action="store_true",
                    help="with --bubble: also run with host/device overlap and compare host/wall time per tick")
    ap.add_argument("--hidden", type=int, default=64, help="--bubble's model hidden size (4 layers)")
    ap.add_argument("--num-kv-blocks", type=int, default=129, help="--bubble's KV blocks of 16 tokens")
    ap.add_argument("--tflops", type=float, default=400.0, help="cost model: dense TFLOP/s per device")
    ap.add_argument("--link-gbs", type=float, default=12.5, help="cost model: inter-stage link GB/s (100 GbE)")
    args = ap.parse_args(argv)
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

    from inspect_sharding import COLLECTIVES, model_config

    config = model_config(args)
    mib = 2**20
    print(f"model: {args.model or 'random-init Llama ~125M'} layers={config.num_layers} H={config.hidden_size} "
          f"V={config.vocab_size} dtype={args.dtype}; KV 512 blocks x 16; tick T=64 tokens, S=8 rows")
    print(f"{'P':>2} {'T':>2} {'layers/stage':>14} {'params/dev MiB':>15} {'x 1/(PT)':>9} {'KV/dev MiB':>11} "
          f"{'x 1/(PT)':>9} " + " ".join(f"{c:>18}" for c in COLLECTIVES))
    grid = [(p, t) for p in args.pp for t in args.tp if p * t <= 8]
    for p, t in grid:
        r = layout_and_hlo(config, p, t, dtype=args.dtype)
        c = r["collectives"]
        print(f"{p:>2} {t:>2} {str(r['counts']):>14} {r['param_bytes_per_device'] / mib:>15.1f} "
              f"{r['param_bytes_per_device'] * p * t / r['param_bytes_total']:>9.3f} "
              f"{r['kv_bytes_per_device'] / mib:>11.1f} {r['kv_bytes_per_device'] * p * t / r['kv_bytes_one_device']:>9.3f} "
              + " ".join(f"{c[k]:>18}" for k in COLLECTIVES))

    print(f"\ncost model per tick ({args.tflops:g} TFLOP/s per device, {args.link_gbs:g} GB/s between stages, "
          f"{'bf16' if args.dtype == 'bfloat16' else 'fp32'} activations):")
    print(f"{'P':>2} {'T':>2} {'tokens':>6} {'stage compute':>14} {'act. transfer':>14} {'act. bytes':>11} "
          f"{'PP step':>10} {'TP(all) step':>13} {'LM head/stage':>14}")
    dtype_bytes = 2 if args.dtype == "bfloat16" else 4
    for p, t in grid:
        for tokens in (64, 512):
            m = cost_model(config, p, t, tokens=tokens, dtype_bytes=dtype_bytes, tflops=args.tflops, link_gbs=args.link_gbs)
            print(f"{p:>2} {t:>2} {tokens:>6} {m['compute_s'] * 1e6:>12.1f}us {m['transfer_s'] * 1e6:>12.1f}us "
                  f"{m['activation_bytes']:>11} {m['pp_step_s'] * 1e6:>8.1f}us {m['tp_step_s'] * 1e6:>11.1f}us "
                  f"{m['lm_head_s'] * 1e6:>12.1f}us")
    print("PP step = P ticks of max(compute, transfer) for one batch's full forward (pipeline full: one tick per "
          "batch); TP(all) = one step with tensor parallelism over all P*T devices across the same link.")

    if args.bubble:
        from jaxllm.core.batch_queue import BUBBLE_REASONS

        print(f"\nlong-tailed run: {args.num_requests} requests, random 4-layer model H={args.hidden}, "
              f"{args.num_kv_blocks} KV blocks of 16, 64-token budget, 16 seats (load: {_load()})")
        run = functools.partial(bubble_run, num_requests=args.num_requests, hidden=args.hidden,
                                num_kv_blocks=args.num_kv_blocks)
        base = run(1)
        print(f"  P=1: {base['steps']} steps, {base['num_preemptions']} preemptions; wall {_per_step(base)}")
        print(f"  {'P':>2} {'overlap':>7} {'ticks':>6} {'in flight':>9} {'bubble':>7} "
              + " ".join(f"{k:>9}" for k in BUBBLE_REASONS) + f" {'budget-full':>11} {'tokens = P=1':>12}  per tick")
        for p in args.pp:
            for overlap in (False, True) if args.overlap else (False,):
                r = run(p, overlap=overlap)
                total = r["num_ticks"] * p
                idle = r["idle_stage_ticks"]
                print(f"  {p:>2} {str(overlap):>7} {r['num_ticks']:>6} {r['max_in_flight']:>9} {r['bubble_fraction']:>7.3f} "
                      + " ".join(f"{idle.get(k, 0) / total:>9.3f}" for k in BUBBLE_REASONS)
                      + f" {r['budget_full_batches']:>5}/{r['batches']:<5} {str(r['tokens'] == base['tokens']):>12}  "
                      + _per_step(r))
        if args.overlap:
            print(f"\n  host/device overlap on ticks of equal work (40 decode-bound requests, 8-token "
                  f"batches; load: {_load()}):")
            for p in args.pp:
                sync, over = (overlap_bench(p, o, args.hidden) for o in (False, True))
                hidden_ms = 1e3 * (sync["wall_s"] / sync["steps"] - over["wall_s"] / over["steps"])
                print(f"    P={p} sync:    {sync['steps']} ticks, {_per_step(sync)}")
                print(f"    P={p} overlap: {over['steps']} ticks, {_per_step(over)}; tokens equal: "
                      f"{over['tokens'] == sync['tokens']}; wall per tick {hidden_ms:+.2f} ms less "
                      f"(of {sync['host_ms']:.2f} ms host), whole run {sync['wall_s']:.2f} s -> {over['wall_s']:.2f} s")
        print("  bubble columns: idle stage-ticks by reason / all stage-ticks (core/batch_queue.py); budget-full: "
              "batches the token budget capped (it never empties one). Weight-bound decode: a tick costs ~1/P "
              "of a P=1 step, and P=1 needs one step where the pipeline needs ~P ticks (each request's next "
              "token waits for its previous one): no speedup beyond memory.")


if __name__ == "__main__":
    main()
