"""How much reserved KV memory holds real tokens, for paging and for static reservation, over
one recorded schedule (the PagedAttention paper's Fig. 2; host only, never imports jax).

Given a run's step table (what each step scheduled, the tokens its requests attend to, the
blocks they reference) and each request's prompt and output lengths, every scheme reserves
memory for the same requests at the same steps:

  paged          the blocks the requests reference (the last block of each is partly empty)
  static_max     max_model_len slots per request (Orca "Max": the longest a request may become)
  static_pow2    the next power of two >= prompt + output (Orca "Pow2")
  static_oracle  exactly prompt + output slots (Orca "Oracle": knows the output length)

fill = sum over steps of tokens held / sum over steps of slots reserved. Static reservation
also forbids sharing, so the schemes count a shared block once per request (referenced).
"""

from __future__ import annotations

import json

import numpy as np


def _parent(request_id: str, known) -> str:
    # Samples of an n > 1 request are "<index>_<id>" children (outputs.ParentRequest.child_id);
    # each is its own sequence, reserving its own memory, with its parent's lengths.
    if request_id in known or "_" not in request_id:
        return request_id
    return request_id.split("_", 1)[1]


def kv_memory_fill(steps, requests, block_size: int, max_model_len: int) -> dict:
    """{scheme: fraction of reserved KV slots holding a token's K/V} over the steps (see above)."""
    total = {p: int(r.prompt_len) + int(r.output_len) for r in requests.itertuples() for p in [str(r.request_id)]}
    held = 0.0
    reserved = {"paged": 0.0, "static_max": 0.0, "static_pow2": 0.0, "static_oracle": 0.0}
    for row in steps.itertuples():
        ids = [_parent(str(rid), total) for rid, _ in json.loads(row.scheduled)]
        lens = np.asarray([total[i] for i in ids], np.float64)
        held += row.num_context_tokens
        reserved["paged"] += row.kv_blocks_referenced * block_size
        reserved["static_max"] += len(ids) * max_model_len
        reserved["static_pow2"] += float(np.sum(2.0 ** np.ceil(np.log2(lens))))
        reserved["static_oracle"] += float(lens.sum())
    return {k: held / v if v else None for k, v in reserved.items()}
