"""Prompt intake: turn what a user passes into token ids, and refuse what can never run.

Host only. Every refusal is a ValueError that names the bad value, raised before the request
touches engine state, so one bad request never disturbs the others.
"""

from __future__ import annotations

import numpy as np

from jaxllm.runner.instrument_inputs import resolve_hidden_layers, resolve_interventions
from jaxllm.sampling_params import SamplingParams


def tokenize_prompt(prompt, tokenizer) -> tuple[str | None, list[int]]:
    """(prompt text or None, token ids) for a str, a list of ids, or {"prompt_token_ids", "prompt"}."""
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ValueError(
                "a text prompt needs a tokenizer, but this model has none; pass "
                "{'prompt_token_ids': [...]} instead"
            )
        return prompt, list(tokenizer(prompt).input_ids)
    if isinstance(prompt, dict):
        if "prompt_token_ids" not in prompt:
            raise ValueError(f"a dict prompt needs 'prompt_token_ids', got keys {sorted(prompt)}")
        return prompt.get("prompt"), as_token_list(prompt["prompt_token_ids"])
    if isinstance(prompt, (list, tuple, np.ndarray)):
        return None, as_token_list(prompt)
    raise ValueError(
        f"prompt must be a str, a list of token ids or a dict with 'prompt_token_ids', "
        f"got {type(prompt).__name__}"
    )


def chat_prompt(tokenizer, conversation, add_generation_prompt: bool = True, **template_kwargs) -> dict:
    """{"prompt": text, "prompt_token_ids": ids} of one conversation (a list of {"role", "content"}
    dicts) formatted by the tokenizer's chat template (LLM.chat and the server's chat endpoint)."""
    if tokenizer is None or getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("this model has no tokenizer with a chat template")
    text = tokenizer.apply_chat_template(conversation, tokenize=False,
                                         add_generation_prompt=add_generation_prompt, **template_kwargs)
    # The template already holds any BOS/special tokens, so don't add them twice.
    return {"prompt": text, "prompt_token_ids": list(tokenizer(text, add_special_tokens=False).input_ids)}


def parse_cache_salt(prompt, cache_salt=None) -> str | None:
    """The request's cache salt: the `cache_salt` argument or the dict prompt's "cache_salt" key
    (not two different ones). Requests with different salts never share prefix-cache blocks."""
    from_prompt = prompt.get("cache_salt") if isinstance(prompt, dict) else None
    for value in (cache_salt, from_prompt):
        if value is not None and not isinstance(value, str):
            raise ValueError(f"cache_salt must be a str, got {value!r}")
    if cache_salt is not None and from_prompt is not None and cache_salt != from_prompt:
        raise ValueError(f"two cache salts: cache_salt={cache_salt!r} and the prompt's {from_prompt!r}")
    return cache_salt if cache_salt is not None else from_prompt


def as_token_list(ids) -> list[int]:
    ids = list(ids)
    if all(type(t) is int for t in ids):  # the common case, checked at C speed (bool is not int here)
        return ids
    out = []
    for t in ids:
        if isinstance(t, (bool, np.bool_)) or not isinstance(t, (int, np.integer)):
            raise ValueError(f"token ids must be ints, got {t!r}")
        out.append(int(t))
    return out


def validate_prompt(token_ids: list[int], params: SamplingParams, *, vocab_size: int,
                    max_model_len: int, block_size: int, num_usable_blocks: int,
                    prefix_caching: bool = False, num_layers: int | None = None,
                    hidden_size: int | None = None) -> None:
    """Refuse an empty prompt, ids outside the vocabulary, a prompt longer than max_model_len,
    and a request (or its n samples together) needing more KV blocks than the whole cache holds
    (it could never run). With prefix caching, n samples share the prompt's full blocks.
    With num_layers and hidden_size, also hidden-state indices and interventions the model
    does not have (see runner/instrument_inputs.py)."""
    if num_layers is not None:
        resolve_hidden_layers(params.output_hidden_states, num_layers)
        resolve_interventions(params.residual_interventions, num_layers, hidden_size)
    if not token_ids:
        raise ValueError("the prompt is empty (0 tokens)")
    bad = [t for t in token_ids if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"prompt token ids {bad[:8]} are outside the vocabulary [0, {vocab_size})")
    if len(token_ids) > max_model_len:
        raise ValueError(
            f"the prompt has {len(token_ids)} tokens, more than max_model_len={max_model_len}"
        )
    # The last sampled token is never written to the cache, hence the -1 (but the whole prompt
    # always is). max_tokens=None runs to max_model_len.
    max_tokens = params.max_tokens if params.max_tokens is not None else max_model_len
    needed_tokens = max(len(token_ids), min(len(token_ids) + max_tokens, max_model_len) - 1)
    needed_blocks = -(-needed_tokens // block_size)
    if needed_blocks > num_usable_blocks:
        raise ValueError(
            f"the request needs {needed_blocks} KV blocks ({len(token_ids)} prompt tokens + "
            f"max_tokens={params.max_tokens}), but the whole cache has {num_usable_blocks}; "
            f"it could never run"
        )
    # n samples run side by side. Through the prefix cache they share the prompt's full blocks,
    # except the one holding the last prompt token, which each sample computes itself.
    shared = (len(token_ids) - 1) // block_size if prefix_caching else 0
    together = shared + params.n * (needed_blocks - shared)
    if params.n > 1 and together > num_usable_blocks:
        raise ValueError(
            f"n={params.n} samples need {together} KV blocks together ({needed_blocks} each, {shared} "
            f"shared), but the whole cache has {num_usable_blocks}; they could never run together"
        )
