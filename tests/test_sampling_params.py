"""SamplingParams validation/normalisation and the host-side batch builder (no device work)."""

import dataclasses

import numpy as np
import pytest

from jaxllm.runner.sampling_inputs import (
    FIELDS,
    build_sampling_arrays,
    seed_to_key_data,
    width_bucket,
)
from jaxllm.sampling_params import SamplingFlags, SamplingParams, logprobs_bucket


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(n=2), "n"),
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


def test_logprobs_bucket():
    assert [logprobs_bucket(n) for n in (0, 1, 5, 6, 20)] == [0, 5, 5, 20, 20]
    with pytest.raises(ValueError):
        logprobs_bucket(21)


def test_fields_match_sampling_inputs():
    from jaxllm.sampling import SamplingInputs

    assert FIELDS == tuple(f.name for f in dataclasses.fields(SamplingInputs))


def test_seed_to_key_data_matches_prng_key():
    import jax

    for seed in (0, 1, 12345, 2**32 - 1):
        np.testing.assert_array_equal(seed_to_key_data(seed), np.asarray(jax.random.PRNGKey(seed)))
    np.testing.assert_array_equal(seed_to_key_data(2**32 + 5), [1, 5])


def test_width_bucket():
    assert [width_bucket(n) for n in (0, 1, 8, 9, 16, 17, 1000)] == [0, 8, 8, 16, 16, 32, 1024]
    assert [width_bucket(n, (64, 512)) for n in (0, 1, 64, 65, 512)] == [0, 64, 64, 512, 512]
    with pytest.raises(ValueError, match="width bucket"):
        width_bucket(513, (64, 512))
    p = SamplingParams(frequency_penalty=1.0)
    a, _ = build_sampling_arrays([(p, 0, [1], [2, 3], [0])], 2, width_buckets=(128,))
    assert a["output_token_ids"].shape == (2, 128)


def test_build_all_greedy_batch_is_minimal():
    rows = [(SamplingParams(temperature=0), 1, [1, 2], [3], [0])]
    arrays, flags = build_sampling_arrays(rows, 4)
    assert flags == SamplingFlags()
    assert set(arrays) == set(FIELDS)
    assert all(arrays[k].shape[0] == 4 for k in FIELDS)
    # No penalties / min_tokens: the history and stop arrays have width 0.
    for k in ("stop_token_ids", "prompt_token_ids", "output_token_ids"):
        assert arrays[k].shape == (4, 0)
    np.testing.assert_array_equal(arrays["steps"], [1, 0, 0, 0])


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
    a, flags = build_sampling_arrays(rows, 4)
    assert flags == SamplingFlags(
        any_random=True,
        any_penalties=True,
        any_min_tokens=True,
        any_top_k=True,
        any_top_p=True,
        any_min_p=True,
        num_logprobs=5,
    )
    np.testing.assert_allclose(a["temperature"], [0.7, 0, 1, 0])
    np.testing.assert_array_equal(a["top_k"], [4, 0, 0, 0])
    np.testing.assert_allclose(a["top_p"], [1, 1, 0.5, 1])
    np.testing.assert_allclose(a["min_p"], [0, 0, 0.1, 0])
    np.testing.assert_allclose(a["repetition_penalty"], [1, 1.3, 1, 1])
    np.testing.assert_allclose(a["frequency_penalty"], [0, 0, 0.5, 0])
    np.testing.assert_array_equal(a["rng_keys"], [[0, 3], [0, 11], [2**8, 7], [0, 0]])
    np.testing.assert_array_equal(a["steps"], [0, 2, 9, 0])
    np.testing.assert_array_equal(a["mask_stop_tokens"], [False, True, False, False])
    assert a["stop_token_ids"].shape == (4, 8)
    np.testing.assert_array_equal(a["stop_token_ids"][1, :3], [6, 2, -1])
    assert (a["stop_token_ids"][[0, 2, 3]] == -1).all()
    # Prompt history only where repetition_penalty is on; output history where any penalty is.
    assert a["prompt_token_ids"].shape == (4, 8)
    np.testing.assert_array_equal(a["prompt_token_ids"][1, :4], [1, 2, 3, -1])
    assert (a["prompt_token_ids"][[0, 2, 3]] == -1).all()
    assert a["output_token_ids"].shape == (4, 16)
    np.testing.assert_array_equal(a["output_token_ids"][2, :10], list(range(9)) + [-1])
    np.testing.assert_array_equal(a["output_token_ids"][1, :3], [4, 4, -1])
    assert a["temperature"].dtype == np.float32 and a["top_k"].dtype == np.int32
    assert a["rng_keys"].dtype == np.uint32 and a["mask_stop_tokens"].dtype == np.bool_


def test_min_tokens_mask_turns_off_once_reached():
    p = SamplingParams(min_tokens=2)
    masked, _ = build_sampling_arrays([(p, 0, [1], [5], [2])], 1)
    done, flags = build_sampling_arrays([(p, 0, [1], [5, 6], [2])], 1)
    assert masked["mask_stop_tokens"][0] and not done["mask_stop_tokens"][0]
    assert not flags.any_min_tokens
    # ignore_eos and no stop ids: nothing to mask.
    p = SamplingParams(min_tokens=2, ignore_eos=True)
    a, flags = build_sampling_arrays([(p, 0, [1], [], [2])], 1)
    assert not a["mask_stop_tokens"][0] and not flags.any_min_tokens


def test_too_many_rows():
    with pytest.raises(ValueError, match="num_rows_padded"):
        build_sampling_arrays([(SamplingParams(), 0, [], [], [])] * 3, 2)
