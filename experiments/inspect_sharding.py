"""Per-device memory and collectives of the tensor-parallel engine step.

    python experiments/inspect_sharding.py --tp 2            # random-init ~125M Llama shape
    python experiments/inspect_sharding.py --tp 4 --model /path/to/hf_dir
    python experiments/inspect_sharding.py --tp 8 --num-kv-heads 2   # KV heads replicated 4x

Nothing is materialised: the engine step (runner.paged_step: forward + sampling, jnp reference
attention) is lowered and compiled on abstract arrays carrying the real shardings, per-device
bytes come from each sharding's shard shape, and collectives are counted in the compiled HLO.
Megatron TP should show 2 all-reduces per layer (after o_proj and after down_proj), plus a few
for the vocabulary-parallel embedding and LM head. On CPU, fake devices with XLA_FLAGS (set
below if not already set). Ops inside a while loop are counted once.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _ROOT)

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")


def model_config(args):
    from jaxllm.models.model_config import ModelConfig, RopeConfig

    if args.model:
        from jaxllm.models.loader import load_config

        return load_config(args.model)
    # ~125M parameters (GPT-2-small/OPT-125M sized), Llama layout, untied LM head.
    return ModelConfig(
        architecture="LlamaForCausalLM", vocab_size=32000, hidden_size=768, intermediate_size=2048,
        num_layers=12, num_heads=12, num_kv_heads=args.num_kv_heads or 12, head_dim=64,
        rms_norm_eps=1e-5, rope=RopeConfig(), max_position_embeddings=2048, tie_word_embeddings=False,
        attention_bias=False, qk_norm=False, layer_sliding_windows=(None,) * 12,
    )


def count_collectives(hlo_text: str) -> dict[str, int]:
    """Number of collective ops in HLO text (async -start/-done pairs count once)."""
    counts = {}
    for name in COLLECTIVES:
        pattern = rf"= [^=\n]*\b{name}(-start)?\("
        counts[name] = len(re.findall(pattern, hlo_text))
    return counts


def inspect(config, tp: int, *, dtype="float32", num_tokens=64, num_seqs=8, num_blocks=512, block_size=16):
    """-> dict with per-device param/KV bytes and collective counts for one TP size."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxllm.attention.metadata import AttentionMetadata
    from jaxllm.attention.reference import ragged_paged_attention
    from jaxllm.models import weights
    from jaxllm.parallel import kv_cache_sharding, make_mesh, replicated, shardings_for, tp_model_config, validate_tp
    from jaxllm.runner.runner import paged_step
    from jaxllm.runner.sampling_inputs import build_sampling_inputs
    from jaxllm.sampling_params import SamplingParams

    validate_tp(config, tp)
    mesh = make_mesh(tp)
    run_config = tp_model_config(config, tp)
    specs = weights.param_specs(run_config, jnp.dtype(dtype))
    shardings = shardings_for(specs, mesh)
    abstract = weights.abstract_params(run_config, jnp.dtype(dtype), shardings)

    def nbytes(shape, dt):
        return int(np.prod(shape)) * jnp.dtype(dt).itemsize

    leaves = jax.tree.leaves(abstract)
    total = sum(nbytes(a.shape, a.dtype) for a in jax.tree.leaves(weights.abstract_params(config, jnp.dtype(dtype))))
    per_device = sum(nbytes(a.sharding.shard_shape(a.shape), a.dtype) for a in leaves)
    kv_shape = (num_blocks, block_size, run_config.num_kv_heads, run_config.head_dim)
    kv_sh = kv_cache_sharding(mesh)
    kv_per_device = 2 * config.num_layers * nbytes(kv_sh.shard_shape(kv_shape), dtype)
    kv_canonical = 2 * config.num_layers * nbytes((num_blocks, block_size, config.num_kv_heads, config.head_dim), dtype)
    kv_abstract = [(jax.ShapeDtypeStruct(kv_shape, dtype, sharding=kv_sh),) * 2 for _ in range(config.num_layers)]

    rep = replicated(mesh)
    rows = [(SamplingParams(temperature=0.0), 0, [1], [], [2])] * num_seqs
    sampling, sampler = build_sampling_inputs(rows, num_seqs, vocab_size=config.vocab_size, history_width=0)

    def spec_of(x):
        return jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype, sharding=rep)

    inputs = jax.tree.map(spec_of, sampling)
    i32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.int32, sharding=rep)  # noqa: E731
    max_blocks = 8
    metadata = AttentionMetadata(slot_mapping=i32(num_tokens), block_tables=i32(num_seqs, max_blocks),
                                 kv_lens=i32(num_seqs), cu_q_lens=i32(num_seqs + 1))

    def step(params, kv_caches, token_ids, positions, metadata, logits_indices, sampling_inputs, prompt_targets):
        return paged_step(params, kv_caches, token_ids, positions, metadata, logits_indices, sampling_inputs,
                          prompt_targets, config=run_config, attention_fn=ragged_paged_attention,
                          sampler=sampler, prompt_logprobs=False)

    jitted = jax.jit(step, donate_argnums=(1,), out_shardings=(rep, [(kv_sh, kv_sh)] * config.num_layers))
    compiled = jitted.lower(abstract, kv_abstract, i32(num_tokens), i32(num_tokens), metadata, i32(num_seqs),
                            inputs, i32(num_tokens)).compile()
    counts = count_collectives(compiled.as_text())
    return {
        "tp": tp, "num_kv_heads_run": run_config.num_kv_heads, "param_bytes_total": total,
        "param_bytes_per_device": per_device, "kv_bytes_canonical": kv_canonical,
        "kv_bytes_per_device": kv_per_device, "collectives": counts, "num_layers": config.num_layers,
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tp", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--model", default=None, help="HF checkpoint dir (only config.json is read)")
    ap.add_argument("--num-kv-heads", type=int, default=None, help="override KV heads of the default shape")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--num-blocks", type=int, default=512)
    args = ap.parse_args(argv)
    os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count={max(8, max(args.tp))}")

    config = model_config(args)
    mib = 2**20
    print(f"model: {args.model or 'random-init Llama'} layers={config.num_layers} H={config.hidden_size} "
          f"heads={config.num_heads} kv_heads={config.num_kv_heads} I={config.intermediate_size} "
          f"V={config.vocab_size} dtype={args.dtype} KV blocks={args.num_blocks}x16")
    header = (f"{'tp':>3} {'kvH/dev':>7} {'params/dev MiB':>15} {'of total':>8} {'KV/dev MiB':>11} "
              f"{'of 1-dev KV':>11} " + " ".join(f"{c:>12}" for c in COLLECTIVES[:3]) + f" {'all-reduce/layer':>16}")
    print(header)
    one_layer = dataclasses.replace(config, num_layers=1, layer_sliding_windows=config.layer_sliding_windows[:1])
    for tp in args.tp:
        r = inspect(config, tp, dtype=args.dtype, num_blocks=args.num_blocks)
        c = r["collectives"]
        # Per layer = (count(L layers) - count(1 layer)) / (L - 1); the rest is outside the layers
        # (vocab-parallel embedding, LM head + sampler reductions).
        c1 = inspect(one_layer, tp, dtype=args.dtype, num_blocks=args.num_blocks)["collectives"]
        per_layer = (c["all-reduce"] - c1["all-reduce"]) / max(1, config.num_layers - 1)
        outside = {k: c1[k] - (per_layer if k == "all-reduce" else 0) for k in c1 if c1[k]}
        print(f"{tp:>3} {r['num_kv_heads_run'] // tp:>7} {r['param_bytes_per_device'] / mib:>15.1f} "
              f"{r['param_bytes_per_device'] / r['param_bytes_total']:>8.3f} {r['kv_bytes_per_device'] / mib:>11.1f} "
              f"{r['kv_bytes_per_device'] / r['kv_bytes_canonical']:>11.3f} "
              + " ".join(f"{c[name]:>12}" for name in COLLECTIVES[:3])
              + f" {per_layer:>16.2f}")
        print(f"    outside the layers: {outside}")
        other = {k: v for k, v in c.items() if k not in COLLECTIVES[:3] and v}
        if other:
            print(f"    also: {other}")


if __name__ == "__main__":
    main()
