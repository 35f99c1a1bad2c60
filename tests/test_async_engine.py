"""AsyncEngine without HTTP: one engine thread, per-request asyncio streams, abort, failures.

The tiny model has the word tokenizer (token i <-> "<wi>"), so texts and stop strings are exact.
"""

import asyncio
import time

import pytest

from jaxllm import LLM, SamplingParams
from jaxllm.async_engine import AsyncEngine, DeltaTracker
from jaxllm.request import CompletionOutput, RequestOutput
from tests.helpers.tiny_models import make_tiny_model, random_prompt
from tests.helpers.tiny_tokenizer import add_word_tokenizer, text_of

VOCAB = 512
# One token bucket: each step variant compiles once (a compilation costs seconds on this CPU).
ENGINE_KW = dict(num_kv_blocks=40, block_size=4, max_num_seqs=8, max_num_batched_tokens=32, max_model_len=64,
                 token_buckets=(32,))


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    path = make_tiny_model(tmp_path_factory.mktemp("async"), arch="llama", seed=5)
    add_word_tokenizer(path, VOCAB)
    return LLM(path, **ENGINE_KW)


@pytest.fixture
def async_engine(llm):
    engine = AsyncEngine(llm.engine)
    yield engine
    engine.shutdown()
    assert not engine._thread.is_alive()
    assert llm.get_stats()["kv_blocks_used"] == 0  # every test leaves no block held


def greedy(max_tokens, **kw):
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kw)


async def collect(stream):
    """Concatenate a stream's deltas per sample: {index: (text, token_ids, finish_reason)}."""
    texts, tokens, reasons, deltas = {}, {}, {}, []
    async for delta in stream:
        deltas.append(delta)
        for c in delta.outputs:
            texts[c.index] = texts.get(c.index, "") + c.text
            tokens.setdefault(c.index, []).extend(c.token_ids)
            if c.finish_reason is not None:
                reasons[c.index] = c.finish_reason
    assert deltas[-1].finished and sum(d.finished for d in deltas) == 1
    return {i: (texts[i], tokens[i], reasons[i]) for i in texts}, deltas


def test_concurrent_streams_match_llm_generate(llm, async_engine):
    prompts = [random_prompt(5 + 3 * i, VOCAB, seed=i) for i in range(6)]
    lengths = [1, 3, 7, 12, 5, 9]
    reference = llm.generate([{"prompt_token_ids": p} for p in prompts],
                             [greedy(n) for n in lengths], use_tqdm=False)

    async def main():
        streams = [async_engine.add_request(text_of(p), greedy(n)) for p, n in zip(prompts, lengths)]
        return await asyncio.gather(*(collect(s) for s in streams))

    results = asyncio.run(main())
    for (by_index, deltas), ref, n in zip(results, reference, lengths):
        text, tokens, reason = by_index[0]
        assert tokens == ref.outputs[0].token_ids and len(tokens) == n
        assert text == ref.outputs[0].text == text_of(tokens)
        assert reason == "length"
        assert deltas[0].prompt_token_ids == ref.prompt_token_ids
        assert deltas[-1].metrics.first_token_time is not None


def test_n_samples_and_stop_strings(llm, async_engine):
    prompt = random_prompt(9, VOCAB, seed=11)
    ref = llm.generate({"prompt_token_ids": prompt}, greedy(12), use_tqdm=False)[0].outputs[0]
    # A two-word stop string first seen at output token i >= 2: the hold-back must not stream its
    # first word before the second decides.
    ids = ref.token_ids
    i = next(i for i in range(2, len(ids) - 1)
             if text_of(ids[:i + 2]).find(text_of(ids[i:i + 2])) == len(text_of(ids[:i])) + 1)
    stop = text_of(ids[i:i + 2])

    async def main():
        # Greedy samples (equal, but each its own request): this module compiles only the greedy step.
        sampled = async_engine.add_request({"prompt_token_ids": prompt}, greedy(6, n=3))
        stopped = async_engine.add_request({"prompt_token_ids": prompt}, greedy(12, stop=[stop]))
        return await collect(sampled), await collect(stopped)

    (samples, _), (stopped, _) = asyncio.run(main())
    assert sorted(samples) == [0, 1, 2]
    for text, tokens, reason in samples.values():
        assert tokens == ref.token_ids[:6] and reason == "length" and text == text_of(tokens)
    text, tokens, reason = stopped[0]
    assert reason == "stop" and text == text_of(ids[:i]) + " "
    assert tokens == ids[:i + 2]  # the token completing the stop string is the last


def test_validation_is_synchronous_and_the_engine_keeps_serving(async_engine):
    async def main():
        with pytest.raises(ValueError, match="70 tokens, more than max_model_len=64"):
            async_engine.add_request({"prompt_token_ids": [5] * 70}, greedy(2))
        with pytest.raises(ValueError, match="outside the vocabulary"):
            async_engine.add_request({"prompt_token_ids": [5, VOCAB]}, greedy(2))
        with pytest.raises(ValueError, match="priority"):
            async_engine.add_request("<w5>", greedy(2), priority="high")
        stream = async_engine.add_request("<w5> <w6>", greedy(3), request_id="same")
        with pytest.raises(ValueError, match="already in use"):
            async_engine.add_request("<w5>", greedy(2), request_id="same")
        return await collect(stream)

    by_index, _ = asyncio.run(main())
    assert len(by_index[0][1]) == 3


def test_leaving_a_stream_aborts_it_and_frees_its_blocks(llm, async_engine):
    async def main():
        long = async_engine.add_request({"prompt_token_ids": random_prompt(20, VOCAB, 1)}, greedy(40))
        others = [async_engine.add_request({"prompt_token_ids": random_prompt(6, VOCAB, s)}, greedy(10))
                  for s in range(3)]
        got = 0
        async for delta in long:
            got += sum(len(c.token_ids) for c in delta.outputs)
            if got >= 3:
                break  # the client went away
        finished = await asyncio.gather(*(collect(s) for s in others))
        for _ in range(100):
            stats = await async_engine.get_stats()
            if stats["num_running"] == 0 and stats["num_waiting"] == 0:
                break
            await asyncio.sleep(0.02)
        return got, finished, stats

    got, finished, stats = asyncio.run(main())
    assert got == 3
    assert [len(by_index[0][1]) for by_index, _ in finished] == [10, 10, 10]
    assert stats["kv_blocks_used"] == 0 and stats["num_running"] == 0


def test_slow_reader_does_not_block_the_engine(async_engine):
    async def main():
        slow = async_engine.add_request("<w7> <w8>", greedy(12))
        fast = [async_engine.add_request(f"<w{9 + s}>", greedy(6)) for s in range(3)]
        fast_results = await asyncio.gather(*(collect(s) for s in fast))
        # The engine finished `slow` while nobody read it; its deltas waited in its queue.
        for _ in range(100):
            if (await async_engine.get_stats())["num_running"] == 0:
                break
            await asyncio.sleep(0.02)
        assert slow._queue.qsize() >= 1
        return fast_results, await collect(slow)

    fast_results, (slow_result, _) = asyncio.run(main())
    assert all(len(by_index[0][1]) == 6 for by_index, _ in fast_results)
    assert len(slow_result[0][1]) == 12


def test_failing_step_ends_its_requests_and_the_loop_lives_on(llm, async_engine):
    calls = []

    def explode_once(stats):  # a step observer that raises: Engine.step raises out of its caller
        calls.append(stats.step)
        if len(calls) == 1:
            raise RuntimeError("observer bug")

    llm.engine.add_step_observer(explode_once)
    try:
        async def main():
            doomed = async_engine.add_request("<w3> <w4>", greedy(5))
            by_index, deltas = await collect(doomed)
            healthy = await collect(async_engine.add_request("<w3> <w4>", greedy(5)))
            return by_index, deltas, healthy

        by_index, deltas, (healthy, _) = asyncio.run(main())
    finally:
        llm.engine.remove_step_observer(explode_once)
    assert by_index[0][2] == "error" and "observer bug" in deltas[-1].error
    assert len(healthy[0][1]) == 5 and healthy[0][2] == "length"
    assert async_engine.num_loop_errors == 1 and async_engine.is_running


def test_idle_engine_thread_sleeps(llm, async_engine):
    async def main():
        await collect(async_engine.add_request("<w3>", greedy(2)))
        steps = llm.engine.num_steps
        await asyncio.sleep(0.3)
        return steps, (await async_engine.get_stats())["num_steps"]

    before, after = asyncio.run(main())
    assert before == after  # no step ran while idle (and the thread still answered)


def test_shutdown_aborts_streams_in_flight(llm):
    engine = AsyncEngine(llm.engine)

    async def main():
        stream = engine.add_request("<w3>", greedy(60))
        async for _ in stream:
            engine.shutdown()  # from the loop: returns after the thread ended the stream
            break
        return stream

    asyncio.run(main())
    assert not engine._thread.is_alive() and llm.get_stats()["kv_blocks_used"] == 0


def _output(text, token_ids, finish_reason=None):
    return RequestOutput("r", None, [1], None, [CompletionOutput(0, text, token_ids, finish_reason=finish_reason)],
                         finished=finish_reason is not None)


def test_delta_tracker_holds_back_possible_stop_strings_and_split_characters():
    tracker = DeltaTracker("r", SamplingParams(stop=["END!"]))
    now = time.monotonic()
    texts = []
    for text, ids, reason in [("Hi E", [1], None), ("Hi EN", [1, 2], None), ("Hi ENx", [1, 2, 3], None),
                              ("Hi ENx \ufffd", [1, 2, 3, 4], None), ("Hi ENx é", [1, 2, 3, 4, 5], None),
                              ("Hi ENx é E", [1, 2, 3, 4, 5, 6], "length")]:
        delta = tracker.update(_output(text, ids, reason), now)
        texts.append(delta.outputs[0].text)
        assert delta.outputs[0].token_ids == ids[-1:]
    assert texts == ["Hi ", "", "ENx", " ", "é", " E"]
    assert "".join(texts) == "Hi ENx é E"


def test_token_id_prompts_over_http_without_a_tokenizer(llm):
    """The app over a tokenizer-less engine (in process, httpx's ASGI transport): token-id
    prompts work, and what needs a tokenizer is a 400 naming the field."""
    import httpx

    from jaxllm.entrypoints.openai.api_server import build_app

    bare = LLM(llm.engine.config.model, skip_tokenizer_init=True, **ENGINE_KW)
    engine = AsyncEngine(bare.engine)
    prompt = random_prompt(7, VOCAB, seed=3)
    ref = llm.generate({"prompt_token_ids": prompt}, greedy(4), use_tqdm=False)[0].outputs[0]

    async def main():
        transport = httpx.ASGITransport(app=build_app(engine, ["bare"]))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            ok = await http.post("/v1/completions", json={
                "prompt": prompt, "max_tokens": 4, "temperature": 0, "ignore_eos": True, "return_token_ids": True})
            text = await http.post("/v1/completions", json={"prompt": "<w5>", "max_tokens": 2})
            chat = await http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
            stop = await http.post("/v1/completions", json={"prompt": prompt, "max_tokens": 2, "stop": "x"})
            return ok, text, chat, stop

    try:
        ok, text, chat, stop = asyncio.run(main())
    finally:
        engine.shutdown()
    choice = ok.json()["choices"][0]
    assert ok.status_code == 200 and choice["token_ids"] == ref.token_ids and choice["text"] == ""
    assert (text.status_code, text.json()["error"]["param"]) == (400, "prompt")
    assert "tokenizer" in text.json()["error"]["message"]
    assert (chat.status_code, chat.json()["error"]["param"]) == (400, "messages")
    assert (stop.status_code, stop.json()["error"]["param"]) == (400, "stop")
    assert bare.get_stats()["kv_blocks_used"] == 0
