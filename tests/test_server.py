"""The OpenAI-compatible server, for real: `python -m jaxllm.serve` in a subprocess on a free
port of 127.0.0.1, driven by the `openai` client (and httpx where a raw connection is needed).

One server for the module (an API key set, one token bucket so only three step variants
compile at warm-up). The tiny model has the word tokenizer (token i <-> "<wi>"), so texts and
stop strings are exact; greedy results are compared with LLM.generate on the same model.
All traffic goes to 127.0.0.1 and every request is bounded (max_tokens, client timeouts).
"""

import asyncio
import os
import random
import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from jaxllm import LLM, SamplingParams
from tests.helpers.tiny_models import make_tiny_model, random_prompt
from tests.helpers.tiny_tokenizer import add_word_tokenizer, text_of

VOCAB = 512
KEY = "test-key"
NAME = "tiny"
ENGINE = dict(max_num_seqs=32, max_num_batched_tokens=64, token_buckets=(64,), block_size=4,
              num_kv_blocks=400, max_model_len=256)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = make_tiny_model(tmp_path_factory.mktemp("server"), arch="llama", seed=7)
    add_word_tokenizer(path, VOCAB)
    return path


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    port = _free_port()
    log_path = tmp_path_factory.mktemp("server_log") / "server.log"
    cmd = [sys.executable, "-m", "jaxllm.serve", model_dir, "--port", str(port), "--api-key", KEY,
           "--served-model-name", NAME, "--uvicorn-log-level", "warning",
           "--max-num-seqs", str(ENGINE["max_num_seqs"]),
           "--max-num-batched-tokens", str(ENGINE["max_num_batched_tokens"]),
           "--token-buckets", *map(str, ENGINE["token_buckets"]), "--block-size", str(ENGINE["block_size"]),
           "--num-gpu-blocks-override", str(ENGINE["num_kv_blocks"]), "--max-model-len", str(ENGINE["max_model_len"])]
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "JAX_PLATFORMS": "cpu"}
    env.pop("JAXLLM_API_KEY", None)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    yield proc, url, log_path  # the reference fixture loads its model while the server starts
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _wait_ready(proc, url, log_path, timeout=300.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the server exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    pytest.fail(f"the server was not ready in {timeout} s:\n{log_path.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def llm(model_dir, server):
    llm = LLM(model_dir, **ENGINE)  # built, and its greedy step compiled, while the server warms up
    llm.generate("<w5>", greedy(1), use_tqdm=False)
    return llm


@pytest.fixture(scope="module")
def url(server, llm):
    proc, url, log_path = server
    _wait_ready(proc, url, log_path)
    return url


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, timeout=60, max_retries=0)


def greedy(n, **kw):
    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, **kw)


def words(n, seed):
    return text_of(random_prompt(n, VOCAB, seed=seed))


def metrics(url) -> dict:
    """{(name, frozenset(labels)): value} of the server's /metrics (model_name label dropped)."""
    out = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text):
        for s in family.samples:
            labels = frozenset((k, v) for k, v in s.labels.items() if k != "model_name")
            out[(s.name, labels)] = s.value
    return out


def metric(m: dict, name: str, **labels) -> float:
    return m.get((name, frozenset(labels.items())), 0.0)


def assert_serves(client):
    """The server still answers a good request."""
    out = client.completions.create(model=NAME, prompt="<w5> <w6>", max_tokens=2, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert len(out.choices) == 1 and out.usage.completion_tokens == 2


def test_cli_help_lists_vllm_flags(capsys):
    from jaxllm.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--host", "--port", "--api-key", "--served-model-name", "--max-num-seqs",
                 "--max-num-batched-tokens", "--max-model-len", "--block-size", "--tensor-parallel-size",
                 "--scheduling-policy", "--enable-prefix-caching", "--no-enable-prefix-caching", "--dtype"):
        assert flag in text


def test_health_models_and_api_key(url, client):
    assert httpx.get(f"{url}/health").status_code == 200  # open without a key, as vLLM
    assert [m.id for m in client.models.list().data] == [NAME]
    for key in (None, "wrong"):
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        r = httpx.get(f"{url}/v1/models", headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert_serves(client)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).completions.create(
            model=NAME, prompt="<w5>", max_tokens=1)
    assert_serves(client)


def test_greedy_matches_llm_generate(llm, client):
    prompts = [words(4, 1), words(9, 2), words(2, 3)]
    lengths = [5, 8, 3]
    ref = llm.generate(prompts, [greedy(n) for n in lengths], use_tqdm=False)
    for p, n, r in zip(prompts, lengths, ref):
        expected = r.outputs[0]
        out = client.completions.create(model=NAME, prompt=p, max_tokens=n, temperature=0,
                                        extra_body={"ignore_eos": True, "return_token_ids": True})
        assert out.choices[0].text == expected.text and out.choices[0].token_ids == expected.token_ids
        assert out.choices[0].finish_reason == "length"
        assert out.usage.prompt_tokens == len(r.prompt_token_ids) and out.usage.completion_tokens == n
        chunks = list(client.completions.create(model=NAME, prompt=p, max_tokens=n, temperature=0, stream=True,
                                                extra_body={"ignore_eos": True}))
        assert "".join(c.choices[0].text for c in chunks) == expected.text
        assert [c.choices[0].finish_reason for c in chunks][-1] == "length"
    # Several prompts in one call, as token ids: choices follow the prompts.
    ids = llm.get_tokenizer()(prompts[1]).input_ids
    many = client.completions.create(model=NAME, prompt=[ids, ids[:3]], max_tokens=4, temperature=0,
                                     extra_body={"ignore_eos": True, "return_token_ids": True})
    ref_many = llm.generate([{"prompt_token_ids": ids}, {"prompt_token_ids": ids[:3]}], greedy(4), use_tqdm=False)
    assert [c.index for c in many.choices] == [0, 1]
    assert [c.token_ids for c in many.choices] == [r.outputs[0].token_ids for r in ref_many]

    conversation = [{"role": "user", "content": words(5, 4)}]
    ref_chat = llm.chat(conversation, greedy(6), use_tqdm=False)[0].outputs[0]
    chat = client.chat.completions.create(model=NAME, messages=conversation, max_completion_tokens=6,
                                          temperature=0, extra_body={"ignore_eos": True})
    assert chat.choices[0].message.content == ref_chat.text and chat.choices[0].message.role == "assistant"
    chunks = list(client.chat.completions.create(model=NAME, messages=conversation, max_tokens=6, temperature=0,
                                                 stream=True, stream_options={"include_usage": True},
                                                 extra_body={"ignore_eos": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ref_chat.text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6


def test_n_logprobs_stop_and_echo(llm, client):
    prompt = words(6, 5)
    out = client.completions.create(model=NAME, prompt=prompt, n=3, max_tokens=5, seed=11, logprobs=2,
                                    extra_body={"ignore_eos": True, "top_k": 50, "min_p": 0.01, "skip_special_tokens": False,
                                                "repetition_penalty": 1.1, "min_tokens": 2})
    assert sorted(c.index for c in out.choices) == [0, 1, 2]
    for c in out.choices:
        assert len(c.logprobs.tokens) == 5 and " ".join(c.logprobs.tokens) == c.text
        assert all(len(top) >= 2 for top in c.logprobs.top_logprobs)
        assert all(lp <= 0 for lp in c.logprobs.token_logprobs)
    assert out.usage.completion_tokens == 15
    again = client.completions.create(model=NAME, prompt=prompt, n=3, max_tokens=5, seed=11, logprobs=2,
                                      extra_body={"ignore_eos": True, "top_k": 50, "min_p": 0.01, "skip_special_tokens": False,
                                                  "repetition_penalty": 1.1, "min_tokens": 2})
    assert [c.text for c in again.choices] == [c.text for c in out.choices]  # seeded

    ref = llm.generate(prompt, greedy(10), use_tqdm=False)[0].outputs[0]
    cut = ref.token_ids.index(ref.token_ids[4])  # stop at the first occurrence of token 4's word
    stop = text_of([ref.token_ids[cut]])
    stopped = client.completions.create(model=NAME, prompt=prompt, max_tokens=10, temperature=0, stop=[stop],
                                        extra_body={"ignore_eos": True})
    assert stopped.choices[0].finish_reason == "stop" and stopped.choices[0].stop_reason == stop
    assert stopped.choices[0].text == text_of(ref.token_ids[:cut]) + (" " if cut else "")
    streamed = list(client.completions.create(model=NAME, prompt=prompt, max_tokens=10, temperature=0,
                                              stop=stop, stream=True, extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in streamed) == stopped.choices[0].text

    echo = client.completions.create(model=NAME, prompt=prompt, max_tokens=3, temperature=0, echo=True,
                                     logprobs=1, extra_body={"ignore_eos": True})
    choice = echo.choices[0]
    assert choice.text == prompt + text_of(ref.token_ids[:3])
    assert choice.logprobs.tokens == prompt.split() + text_of(ref.token_ids[:3]).split()
    assert choice.logprobs.token_logprobs[0] is None and all(lp is not None for lp in choice.logprobs.token_logprobs[1:])

    chat = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": prompt}], max_tokens=4,
                                          temperature=0, logprobs=True, top_logprobs=3, n=2,
                                          extra_body={"ignore_eos": True})
    for c in chat.choices:
        assert len(c.logprobs.content) == 4 and all(len(e.top_logprobs) == 3 for e in c.logprobs.content)
        assert " ".join(e.token for e in c.logprobs.content) == c.message.content


def test_200_concurrent_streams(llm, url):
    rng = random.Random(0)
    prompts = [words(rng.randint(2, 10), 100 + i) for i in range(200)]
    lengths = [rng.randint(1, 12) for _ in range(200)]
    before = metrics(url)

    async def one(client, prompt, n):
        stream = await client.completions.create(
            model=NAME, prompt=prompt, max_tokens=n, temperature=0, stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True, "skip_special_tokens": False, "return_token_ids": True})
        ids, text, reasons, usage = [], "", [], None
        async for chunk in stream:
            usage = chunk.usage or usage
            for c in chunk.choices:
                text += c.text
                ids += c.token_ids
                reasons += [c.finish_reason] if c.finish_reason else []
        return ids, text, reasons, usage

    async def main():
        async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=KEY, timeout=120, max_retries=0) as client:
            return await asyncio.wait_for(
                asyncio.gather(*(one(client, p, n) for p, n in zip(prompts, lengths))), timeout=240)

    results = asyncio.run(main())
    ref = llm.generate(prompts, [greedy(n, skip_special_tokens=False) for n in lengths], use_tqdm=False)
    for (ids, text, reasons, usage), n, r in zip(results, lengths, ref):
        assert len(ids) == n and usage.completion_tokens == n and reasons == ["length"]
        assert text == text_of(ids)  # every token's text arrived once, in order
        assert ids == r.outputs[0].token_ids  # and they are LLM.generate's
    after = metrics(url)
    assert metric(after, "jaxllm:request_success_total", finished_reason="length") - \
        metric(before, "jaxllm:request_success_total", finished_reason="length") == 200
    assert metric(after, "jaxllm:generation_tokens_total") - metric(before, "jaxllm:generation_tokens_total") \
        == sum(lengths)
    assert metric(after, "jaxllm:num_requests_running") == 0 and metric(after, "jaxllm:num_requests_waiting") == 0
    assert metric(after, "jaxllm:kv_cache_blocks_used") == 0 and metric(after, "jaxllm:kv_cache_usage_perc") == 0
    assert metric(after, "jaxllm:time_to_first_token_seconds_count") - \
        metric(before, "jaxllm:time_to_first_token_seconds_count") == 200


def test_disconnect_mid_stream_aborts_and_frees_blocks(url):
    before = metrics(url)
    headers = {"Authorization": f"Bearer {KEY}"}

    async def leave_early(http):
        body = {"model": NAME, "prompt": words(8, 9), "max_tokens": 200, "temperature": 0, "stream": True,
                "ignore_eos": True}
        got = 0
        async with http.stream("POST", "/v1/completions", json=body) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                got += line.startswith("data: {")
                if got == 3:
                    break  # leaving the block closes the connection mid-stream
        return got

    async def finish(client, seed):
        stream = await client.completions.create(model=NAME, prompt=words(5, seed), max_tokens=20, temperature=0,
                                                 stream=True, stream_options={"include_usage": True},
                                                 extra_body={"ignore_eos": True})
        usage = None
        async for chunk in stream:
            usage = chunk.usage or usage
        return usage.completion_tokens

    async def give_up_waiting(http):  # not streaming: the client times out and closes the connection
        body = {"model": NAME, "prompt": words(8, 10), "max_tokens": 200, "temperature": 0, "ignore_eos": True}
        with pytest.raises(httpx.ReadTimeout):
            await http.post("/v1/completions", json=body, timeout=0.05)  # 200 tokens take far longer

    async def main():
        async with httpx.AsyncClient(base_url=url, headers=headers, timeout=60) as http, \
                openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=KEY, timeout=60, max_retries=0) as client:
            return await asyncio.gather(leave_early(http), give_up_waiting(http),
                                        *(finish(client, s) for s in range(4)))

    got, _, *others = asyncio.run(main())
    assert got == 3 and others == [20, 20, 20, 20]
    deadline = time.monotonic() + 20
    while True:
        after = metrics(url)
        idle = metric(after, "jaxllm:num_requests_running") == 0 and metric(after, "jaxllm:num_requests_waiting") == 0
        if idle or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert idle and metric(after, "jaxllm:kv_cache_blocks_used") == 0
    assert metric(after, "jaxllm:request_success_total", finished_reason="abort") - \
        metric(before, "jaxllm:request_success_total", finished_reason="abort") == 2
    # Aborted, not run to their 200 tokens each: the others made 80.
    assert metric(after, "jaxllm:generation_tokens_total") - metric(before, "jaxllm:generation_tokens_total") < 280


@pytest.mark.parametrize("kwargs, status, param", [
    (dict(prompt=" ".join(["<w5>"] * 300)), 400, "prompt"),  # longer than max_model_len=256
    (dict(prompt=[5, VOCAB + 1]), 400, "prompt"),  # a token outside the vocabulary
    (dict(prompt="<w5>", temperature=-1), 400, "temperature"),
    (dict(prompt="<w5>", n=0), 400, "n"),
    (dict(prompt="<w5>", logprobs=21), 400, "logprobs"),
    (dict(prompt="<w5>", max_tokens=0), 400, "max_tokens"),
    (dict(prompt="<w5>", extra_body={"top_k": -4}), 400, "top_k"),
    (dict(prompt="<w5>", extra_body={"min_p": 2}), 400, "min_p"),
    (dict(prompt="<w5>", extra_body={"max_tokens": "many"}), 400, "max_tokens"),
    (dict(prompt="<w5>", extra_body={"stop": [3]}), 400, "stop"),
    (dict(prompt="<w5>", suffix="x"), 400, "suffix"),
    (dict(prompt="<w5>", model="no-such-model"), 404, "model"),
    (dict(messages=[]), 400, "messages"),
    (dict(messages=[{"role": "user", "content": "<w5>"}], top_logprobs=2), 400, "top_logprobs"),
    (dict(messages=[{"role": "user", "content": "<w5>"}], max_completion_tokens=-1), 400, "max_completion_tokens"),
])
def test_errors_name_the_field_and_the_server_keeps_serving(client, kwargs, status, param):
    kwargs = {"model": NAME, "max_tokens": 2, **kwargs} if "prompt" in kwargs else {"model": NAME, **kwargs}
    create = client.completions.create if "prompt" in kwargs else client.chat.completions.create
    with pytest.raises(openai.APIStatusError) as info:
        create(**kwargs)
    error = info.value.response.json()["error"]
    assert info.value.status_code == status and error["param"] == param, error
    assert (param if param != "model" else "no-such-model") in error["message"], error
    assert_serves(client)


def test_malformed_bodies_are_400(url, client):
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    r = httpx.post(f"{url}/v1/completions", content=b"{not json", headers=headers)
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = httpx.post(f"{url}/v1/completions", json={"model": NAME}, headers=headers)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    assert_serves(client)


def test_metrics_have_vllm_like_names(url, client):
    before = metrics(url)
    client.completions.create(model=NAME, prompt="<w7> <w8> <w9>", max_tokens=4, temperature=0,
                              extra_body={"ignore_eos": True})
    after = metrics(url)
    for name in ("jaxllm:num_requests_running", "jaxllm:num_requests_waiting", "jaxllm:kv_cache_usage_perc",
                 "jaxllm:prefix_cache_queries_total", "jaxllm:prefix_cache_hits_total",
                 "jaxllm:num_preemptions_total", "jaxllm:time_to_first_token_seconds_count",
                 "jaxllm:inter_token_latency_seconds_count", "jaxllm:e2e_request_latency_seconds_count",
                 "jaxllm:request_queue_time_seconds_count"):
        assert any(key[0] == name for key in after), name
    assert metric(after, "jaxllm:prompt_tokens_total") - metric(before, "jaxllm:prompt_tokens_total") == 3
    assert metric(after, "jaxllm:generation_tokens_total") - metric(before, "jaxllm:generation_tokens_total") == 4
    assert metric(after, "jaxllm:inter_token_latency_seconds_count") - \
        metric(before, "jaxllm:inter_token_latency_seconds_count") == 3
    assert metric(after, "jaxllm:num_compilations_total") == metric(before, "jaxllm:num_compilations_total")


def test_bench_serve_client_against_the_server(url):
    """The serving benchmark's client (Poisson arrivals, streamed timings) on a short run."""
    import argparse

    from jaxllm.entrypoints.openai import bench_serve

    parser = argparse.ArgumentParser()
    bench_serve.add_arguments(parser)
    args = parser.parse_args(["--base-url", url, "--api-key", KEY, "--num-prompts", "8", "--request-rate", "40",
                              "--input-len", "6", "--output-len", "3", "--seed", "1",
                              "--words", ",".join(f"<w{i}>" for i in range(3, 40))])
    summary = asyncio.run(bench_serve.run(args))
    assert summary["model"] == NAME and summary["completed"] == 8 and summary["failed"] == 0, summary
    assert summary["total_output_tokens"] == 24  # ignore_eos: exactly output_len each
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        stats = summary[key]
        assert 0 < stats["median"] <= stats["p90"] <= stats["p99"], (key, stats)
    assert summary["ttft_ms"]["median"] <= summary["e2e_ms"]["median"]
    assert "ttft_ms" in bench_serve.format_summary(summary)
    gaps = bench_serve.arrival_gaps(2000, 4.0, seed=0)
    assert abs(sum(gaps) / len(gaps) - 0.25) < 0.02 and bench_serve.arrival_gaps(3, float("inf"), 0) == [0.0] * 3
