"""SamplingParams validation/normalisation and the host-side batch builder (no device work)."""

import dataclasses

import numpy as np
import pytest

from jaxllm.runner.sampling_inputs import GENERAL, GREEDY, build_sampling_inputs, seed_to_key_data
from jaxllm.sampling_params import SamplingParams

V, H = 16, 32  # vocabulary and token_history width of the builder tests


def build(rows, num_rows_padded, **kwargs):
    return build_sampling_inputs(rows, num_rows_padded, vocab_size=V, history_width=H, **kwargs)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(n=0), "n"),
        (dict(n=1.5), "n"),
        (dict(temperature=-0.1), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(temperature="hot"), "temperature"),
        (dict(top_k=-2), "top_k"),
        (dict(top_k=1.5), "top_k"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.1), "top_p"),
        (dict(min_p=-0.1), "min_p"),
        (dict(min_p=1.5), "min_p"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
        (dict(presence_penalty=2.5), "presence_penalty"),
        (dict(frequency_penalty=-3), "frequency_penalty"),
        (dict(seed="x"), "seed"),
        (dict(max_tokens=0), "max_tokens"),
        (dict(min_tokens=-1), "min_tokens"),
        (dict(min_tokens=17), "min_tokens"),  # > default max_tokens 16
        (dict(stop=[""]), "stop"),
        (dict(stop=[1]), "stop"),
        (dict(stop_token_ids=[-1]), "stop_token_ids"),
        (dict(logprobs=-1), "logprobs"),
        (dict(logprobs=21), "logprobs"),
        (dict(prompt_logprobs=100), "prompt_logprobs"),
    ],
)
def test_validation_names_field_and_value(kwargs, field):
    with pytest.raises(ValueError) as e:
        SamplingParams(**kwargs)
    msg = str(e.value)
    assert msg.startswith(field + " "), msg
    assert repr(next(iter(kwargs.values()))) in msg, msg


def test_defaults_and_normalisation():
    p = SamplingParams()
    assert (p.temperature, p.top_p, p.top_k, p.min_p, p.max_tokens) == (1.0, 1.0, 0, 0.0, 16)
    assert p.stop == [] and p.stop_token_ids == [] and not p.greedy and not p.has_penalties
    assert SamplingParams(stop="x").stop == ["x"]
    assert SamplingParams(stop=("a", "b")).stop == ["a", "b"]
    assert SamplingParams(top_k=-1).top_k == 0
    assert SamplingParams(stop_token_ids=[np.int64(3)]).stop_token_ids == [3]
    assert SamplingParams(temperature=np.float32(0.5), seed=np.int64(3)).temperature == 0.5
    # Tiny positive temperatures are clamped (vLLM), below 1e-5 is greedy.
    assert SamplingParams(temperature=1e-3).temperature == 1e-2
    g = SamplingParams(temperature=1e-6, top_k=3, top_p=0.5, min_p=0.3)
    assert g.greedy and (g.temperature, g.top_k, g.top_p, g.min_p) == (0.0, 0, 1.0, 0.0)
    assert SamplingParams(presence_penalty=0.1).has_penalties


def test_all_stop_token_ids():
    p = SamplingParams(stop_token_ids=[5, 7])
    assert p.all_stop_token_ids([2, 5]) == [5, 7, 2]
    assert SamplingParams(stop_token_ids=[5], ignore_eos=True).all_stop_token_ids([2]) == [5]


def test_seed_to_key_data_matches_prng_key():
    import jax

    for seed in (0, 1, 12345, 2**32 - 1):
        np.testing.assert_array_equal(seed_to_key_data(seed), np.asarray(jax.random.PRNGKey(seed)))
    np.testing.assert_array_equal(seed_to_key_data(2**32 + 5), [1, 5])


def test_build_all_greedy_batch_is_minimal():
    rows = [(SamplingParams(temperature=0, logprobs=0), 1, [1, 2], [3], [0])]
    a, sampler = build(rows, 4)
    assert sampler == GREEDY
    assert all(getattr(a, f.name).shape[0] == 4 for f in dataclasses.fields(a))
    # The greedy sampler reads no history and no stop mask: width 0.
    assert a.token_history.shape == (4, 0) and a.stop_token_mask.shape == (4, 0)
    np.testing.assert_array_equal(a.steps, [1, 0, 0, 0])
    # prompt logprobs (force_general) and any non-greedy feature switch to the general sampler
    assert build(rows, 4, force_general=True)[1] == GENERAL
    for p in (SamplingParams(temperature=0.5), SamplingParams(temperature=0, logprobs=1),
              SamplingParams(temperature=0, presence_penalty=0.1), SamplingParams(temperature=0, min_tokens=2)):
        assert build([(p, 1, [1], [], [0])], 4)[1] == GENERAL, p


def test_build_arrays_values_and_padding():
    rows = [
        (SamplingParams(temperature=0.7, top_k=4, seed=3, logprobs=2), 3, [9, 9, 8], [], [2]),
        (
            SamplingParams(temperature=0, repetition_penalty=1.3, min_tokens=3, stop_token_ids=[6]),
            11,
            [1, 2, 3],
            [4, 4],
            [2],
        ),
        (SamplingParams(top_p=0.5, min_p=0.1, frequency_penalty=0.5), 2**40 + 7, [5], list(range(9)), [2]),
    ]
    a, sampler = build(rows, 4)
    assert sampler == GENERAL
    np.testing.assert_allclose(a.temperature, [0.7, 0, 1, 0])
    np.testing.assert_array_equal(a.top_k, [4, 0, 0, 0])
    np.testing.assert_allclose(a.top_p, [1, 1, 0.5, 1])
    np.testing.assert_allclose(a.min_p, [0, 0, 0.1, 0])
    np.testing.assert_allclose(a.repetition_penalty, [1, 1.3, 1, 1])
    np.testing.assert_allclose(a.frequency_penalty, [0, 0, 0.5, 0])
    np.testing.assert_array_equal(a.rng_keys, [[0, 3], [0, 11], [2**8, 7], [0, 0]])
    np.testing.assert_array_equal(a.steps, [0, 2, 9, 0])
    np.testing.assert_array_equal(a.num_top_logprobs, [2, 0, 0, 0])
    np.testing.assert_array_equal(a.num_prompt_tokens, [3, 3, 1, 0])
    # min_tokens: row 1 masks its stop id and EOS; nobody else masks anything.
    assert a.stop_token_mask.shape == (4, V)
    np.testing.assert_array_equal(np.nonzero(a.stop_token_mask[1])[0], [2, 6])
    assert not a.stop_token_mask[[0, 2, 3]].any()
    # History (prompt, then outputs) only for rows with penalties, -1 padded to H.
    assert a.token_history.shape == (4, H)
    np.testing.assert_array_equal(a.token_history[1, :6], [1, 2, 3, 4, 4, -1])
    np.testing.assert_array_equal(a.token_history[2, :11], [5] + list(range(9)) + [-1])
    assert (a.token_history[[0, 3]] == -1).all()
    assert a.temperature.dtype == np.float32 and a.top_k.dtype == np.int32
    assert a.rng_keys.dtype == np.uint32 and a.stop_token_mask.dtype == np.bool_


def test_unused_wide_arrays_are_left_to_the_runner():
    """A general step where no row has penalties or a min_tokens mask ships neither wide array."""
    a, sampler = build([(SamplingParams(temperature=1.0, top_k=3), 0, [1, 2], [3], [0])], 2)
    assert sampler == GENERAL and a.token_history is None and a.stop_token_mask is None
    full = a.with_neutral_arrays(H, V)
    assert full.token_history.shape == (2, H) and (full.token_history == -1).all()
    assert full.stop_token_mask.shape == (2, V) and not full.stop_token_mask.any()


def test_min_tokens_mask_turns_off_once_reached():
    p = SamplingParams(min_tokens=2)
    masked, _ = build([(p, 0, [1], [5], [2])], 1)
    done, _ = build([(p, 0, [1], [5, 6], [2])], 1)
    assert masked.stop_token_mask[0, 2] and done.stop_token_mask is None
    # ignore_eos and no stop ids: nothing to mask.
    p = SamplingParams(min_tokens=2, ignore_eos=True)
    a, _ = build([(p, 0, [1], [], [2])], 1)
    assert a.stop_token_mask is None


def test_too_many_rows():
    with pytest.raises(ValueError, match="num_rows_padded"):
        build([(SamplingParams(), 0, [], [], [])] * 3, 2)
