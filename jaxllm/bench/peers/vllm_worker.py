"""Runs one offline-throughput workload on vLLM, in vLLM's own virtual environment.

    $VLLM_VENV/bin/python jaxllm/bench/peers/vllm_worker.py workload.json result.json

Self-contained on purpose: it imports vllm (and the standard library), never jaxllm, so it runs
under the peer's interpreter (experiments/peers/setup_vllm.sh builds it) with no jaxllm install.
The caller (experiments/bench_vs_vllm.py) writes the workload and reads the result; both are JSON.

Workload keys:
  model             a local HF directory (config.json + safetensors + tokenizer)
  prompts           list of prompt token-id lists
  output_lens       list of exact output lengths (ignore_eos, greedy)
  max_num_seqs, max_num_batched_tokens, max_model_len, dtype ("float32"), block_size (optional:
                    vLLM's CPU attention wants a multiple of 32; by default vLLM chooses),
  kv_cache_gib      (optional) VLLM_CPU_KVCACHE_SPACE in whole GiB, when the caller did not set it

Result keys: output_tokens_per_s, total_tokens_per_s, elapsed_s, startup_s (LLM(...) until it is
ready, including its torch.compile warm-up), first_request_s (a one-token request right after),
peak_rss_bytes (this process and its children: vLLM runs its engine core in a child process),
kv_cache_bytes (from vLLM's resolved block count when it exposes it, else the configured
budget), token_ids (per request), vllm_version, torch_version, env (the VLLM_CPU_* settings).

The caller sets the environment (VLLM_CPU_OMP_THREADS_BIND, VLLM_CPU_NUM_OF_RESERVED_CPU, ...);
the `__main__` guard is required because vLLM spawns its engine process.
"""

import json
import os
import sys
import threading
import time


def _tree_rss_bytes(root_pid: int) -> int:
    """Resident bytes of root_pid and all its descendants (from /proc; Linux only)."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    page = os.sysconf("SC_PAGE_SIZE")
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid, ppid = int(name), int(fields[1])
        children.setdefault(ppid, []).append(pid)
        rss[pid] = int(fields[21]) * page  # field 24 of stat: rss in pages
    total, todo = 0, [root_pid]
    while todo:
        pid = todo.pop()
        total += rss.get(pid, 0)
        todo.extend(children.get(pid, []))
    return total


class _PeakRss:
    """Samples the process tree's RSS every `period` seconds on a daemon thread."""

    def __init__(self, period: float = 0.2):
        self.peak = 0
        self._stop = threading.Event()
        self._period = period
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _tree_rss_bytes(os.getpid()))
            self._stop.wait(self._period)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self.peak, _tree_rss_bytes(os.getpid()))


def _kv_cache_bytes(llm, configured_gib):
    """KV bytes vLLM allocated, from its resolved config when this version exposes it."""
    try:
        cfg = llm.llm_engine.vllm_config
        blocks = cfg.cache_config.num_gpu_blocks
        mc = cfg.model_config
        hf = mc.hf_config
        per_block = (2 * hf.num_hidden_layers * cfg.cache_config.block_size * hf.num_key_value_heads
                     * mc.get_head_size() * 4)
        if blocks:
            return int(blocks) * per_block, "num_gpu_blocks"
    except Exception:  # noqa: BLE001 - an attribute moved between versions: fall back
        pass
    return int(float(configured_gib) * (1 << 30)), "VLLM_CPU_KVCACHE_SPACE"


def main(workload_path: str, result_path: str) -> None:
    with open(workload_path) as f:
        w = json.load(f)
    if w.get("kv_cache_gib") is not None:
        # vLLM parses this variable as an int (GiB): "2.0" fails its config validation.
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, int(round(float(w["kv_cache_gib"]))))))
    rss = _PeakRss()

    import torch
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    t0 = time.perf_counter()
    kwargs = dict(
        model=w["model"],
        dtype=w.get("dtype", "float32"),
        max_num_seqs=int(w["max_num_seqs"]),
        max_num_batched_tokens=int(w["max_num_batched_tokens"]),
        max_model_len=int(w["max_model_len"]),
        seed=0,
    )
    if w.get("block_size"):
        kwargs["block_size"] = int(w["block_size"])
    if not any(os.path.exists(os.path.join(w["model"], f)) for f in ("tokenizer.json", "tokenizer_config.json")):
        kwargs["skip_tokenizer_init"] = True  # token-id prompts and detokenize=False need none
    llm = LLM(**kwargs)
    startup_s = time.perf_counter() - t0

    t1 = time.perf_counter()
    first = [TokensPrompt(prompt_token_ids=w["prompts"][0][:8])]
    llm.generate(first, SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True, detokenize=False),
                 use_tqdm=False)
    first_request_s = time.perf_counter() - t1

    prompts = [TokensPrompt(prompt_token_ids=p) for p in w["prompts"]]
    params = [SamplingParams(max_tokens=int(n), min_tokens=int(n), temperature=0.0, ignore_eos=True,
                             detokenize=False) for n in w["output_lens"]]
    t2 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - t2

    token_ids = [list(o.outputs[0].token_ids) for o in outs]
    out_tokens = sum(len(t) for t in token_ids)
    prompt_tokens = sum(len(p) for p in w["prompts"])
    kv_bytes, kv_source = _kv_cache_bytes(llm, os.environ.get("VLLM_CPU_KVCACHE_SPACE", 0) or 0)
    result = {
        "output_tokens_per_s": out_tokens / elapsed,
        "total_tokens_per_s": (out_tokens + prompt_tokens) / elapsed,
        "elapsed_s": elapsed,
        "num_output_tokens": out_tokens,
        "startup_s": startup_s,
        "first_request_s": first_request_s,
        "peak_rss_bytes": rss.stop(),
        "kv_cache_bytes": kv_bytes,
        "kv_cache_bytes_source": kv_source,
        "token_ids": token_ids,
        "vllm_version": vllm.__version__,
        "torch_version": torch.__version__,
        "env": {k: v for k, v in os.environ.items() if k.startswith("VLLM_")},
    }
    with open(result_path, "w") as f:
        json.dump(result, f)
    del llm


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: vllm_worker.py WORKLOAD.json RESULT.json")
    main(sys.argv[1], sys.argv[2])
