"""Device sampler: exact logit processing against numpy, sampled distributions against numpy
targets (many rows with different seeds, fixed so the test is deterministic), batch independence."""

import functools

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from jaxllm.runner.sampling_inputs import GENERAL, GREEDY, build_sampling_inputs
from jaxllm.sampling import apply_penalties, sample, sample_jit, token_logprobs_jit
from jaxllm.sampling_params import SamplingParams

V = 8
# Known logits with distinct values (so no ties at top_k/top_p/min_p cut-offs).
LOGITS = np.array([2.0, 1.5, 1.0, 0.6, 0.3, 0.0, -0.5, -1.0], np.float32)
N_DRAWS = 4000
# Max |empirical - target| over 8 tokens: std <= sqrt(0.25 / 4000) = 0.0079, so 0.03 is ~4 sigma
# (and the draws are fixed by the seeds, so the test cannot flake).
TOL = 0.03
EOS = 7


def np_softmax(x):
    x = np.asarray(x, np.float64)
    e = np.exp(x - x[np.isfinite(x)].max())
    return e / e.sum()


def np_log_softmax(x):
    x = np.asarray(x, np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def np_penalties(logits, prompt, output, p: SamplingParams):
    """vLLM's apply_penalties for one row, in float64."""
    out = np.asarray(logits, np.float64).copy()
    counts = np.bincount(np.asarray(output, np.int64), minlength=len(out))
    seen = (np.bincount(np.asarray(prompt, np.int64), minlength=len(out)) > 0) | (counts > 0)
    rep = p.repetition_penalty
    out[seen] = np.where(out[seen] > 0, out[seen] / rep, out[seen] * rep)
    return out - p.frequency_penalty * counts - p.presence_penalty * (counts > 0)


def np_target(logits, p: SamplingParams):
    """Distribution vLLM samples from: temperature -> min_p -> top_k -> top_p (no penalties)."""
    z = np.asarray(logits, np.float64) / p.temperature
    probs = np_softmax(z)
    keep = probs >= p.min_p * probs.max()
    if p.top_k > 0:
        keep &= z >= np.sort(z[keep])[::-1][min(p.top_k, keep.sum()) - 1]
    if p.top_p < 1:
        q = np.where(keep, probs, 0)
        q /= q.sum()
        order = np.argsort(-q)
        exclusive = np.cumsum(q[order]) - q[order]
        keep_sorted = exclusive < p.top_p
        keep_p = np.zeros_like(keep)
        keep_p[order[keep_sorted]] = True
        keep &= keep_p
    q = np.where(keep, probs, 0)
    return q / q.sum()


HISTORY = 64  # token_history width (the engine uses max_model_len)


def build(rows, num_rows_padded, vocab, force_general=False):
    """(SamplingInputs with neutral arrays materialised, sampler) as the runner would pass them."""
    inputs, sampler = build_sampling_inputs(rows, num_rows_padded, vocab_size=vocab, history_width=HISTORY,
                                            force_general=force_general)
    return inputs.with_neutral_arrays(HISTORY, vocab), sampler


def run(rows, logits, num_rows_padded=None, force_general=False):
    logits = np.asarray(logits, np.float32)
    inputs, sampler = build(rows, num_rows_padded or len(rows), logits.shape[1], force_general)
    if logits.shape[0] < inputs.num_rows:
        pad = np.zeros((inputs.num_rows - logits.shape[0], logits.shape[1]))
        logits = np.concatenate([logits, pad.astype(np.float32)])
    out = sample_jit(jnp.asarray(logits), inputs, sampler=sampler)
    return jax.tree.map(np.asarray, out), sampler


CONFIGS = [
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.5),
    SamplingParams(temperature=2.0),
    SamplingParams(temperature=1.0, top_k=3),
    SamplingParams(temperature=1.0, top_p=0.7),
    SamplingParams(temperature=1.0, min_p=0.3),
    SamplingParams(temperature=0.7, top_k=6, top_p=0.8, min_p=0.05),
]


def test_distributions_match_numpy_targets():
    # All configs in ONE batch: per-row parameters must not leak between rows.
    rows = [
        (p, 1000 * c + i, [], [], [EOS]) for c, p in enumerate(CONFIGS) for i in range(N_DRAWS)
    ]
    logits = np.tile(LOGITS, (len(rows), 1))
    out, sampler = run(rows, logits)
    assert sampler == GENERAL
    tokens = out.token_ids.reshape(len(CONFIGS), N_DRAWS)
    for c, p in enumerate(CONFIGS):
        target = np_target(LOGITS, p)
        freq = np.bincount(tokens[c], minlength=V) / N_DRAWS
        assert np.all(freq[target == 0] == 0), (p, freq, target)  # masked tokens never drawn
        np.testing.assert_allclose(freq, target, atol=TOL, err_msg=str(p))
    # The knobs really differ from plain sampling (guards against a no-op implementation).
    base = np_target(LOGITS, CONFIGS[0])
    for p in CONFIGS[1:]:
        assert np.abs(np_target(LOGITS, p) - base).max() > 2 * TOL


def test_steps_give_fresh_randomness():
    # One seed, many steps: each step draws anew, and the draws follow the distribution.
    p = SamplingParams(temperature=1.0)
    rows = [(p, 42, [], [0] * step, [EOS]) for step in range(N_DRAWS)]
    out, _ = run(rows, np.tile(LOGITS, (N_DRAWS, 1)))
    freq = np.bincount(out.token_ids, minlength=V) / N_DRAWS
    np.testing.assert_allclose(freq, np_target(LOGITS, p), atol=TOL)


def test_batch_independence():
    """A row's token depends only on its seed, step and logits: not on S or its row position."""
    rng = np.random.default_rng(0)
    vocab = 32
    target_params = SamplingParams(temperature=0.9, top_k=20, top_p=0.95, seed=5)
    target_logits = rng.normal(size=vocab).astype(np.float32)
    others = [
        SamplingParams(temperature=0),
        SamplingParams(temperature=1.3, min_p=0.1, repetition_penalty=1.2),
        SamplingParams(temperature=0.5, frequency_penalty=1.0, logprobs=3),
    ]
    alone_tokens = set()
    for step in range(10):
        target_row = (target_params, 5, [1, 2], [3] * step, [0])
        alone, _ = run([target_row], target_logits[None])
        alone_tokens.add(int(alone.token_ids[0]))
        batch = [(q, 100 + j, [4], [5, 6], [0]) for j, q in enumerate(others)]
        batch.insert(2, target_row)
        logits = rng.normal(size=(len(batch), vocab)).astype(np.float32)
        logits[2] = target_logits
        together, _ = run(batch, logits, num_rows_padded=8)
        assert alone.token_ids[0] == together.token_ids[2], step
    assert len(alone_tokens) > 1  # each step draws fresh noise


def test_greedy_is_argmax_of_penalised_logits():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(4, 16)).astype(np.float32)
    params = [
        SamplingParams(temperature=0),
        SamplingParams(temperature=0, top_k=1, top_p=0.1),  # ignored for greedy
        SamplingParams(temperature=0, repetition_penalty=2.0, frequency_penalty=1.5),
        SamplingParams(temperature=1.0),  # a random row in the batch changes nothing for the others
    ]
    top2 = int(np.argmax(logits[2]))
    prompts, outputs = [[1], [2], [3], []], [[], [4], [top2, 5], []]
    rows = [(p, i, prompts[i], outputs[i], [0]) for i, p in enumerate(params)]
    out, _ = run(rows, logits)
    for i in range(3):
        expected = np_penalties(logits[i], prompts[i], outputs[i], params[i])
        assert out.token_ids[i] == np.argmax(expected)
    assert out.token_ids[2] != np.argmax(logits[2])  # the penalty moved the argmax
    out_greedy_only, sampler = run(rows[:3], logits[:3])
    assert sampler == GENERAL  # penalties need the general sampler even with greedy rows only
    np.testing.assert_array_equal(out_greedy_only.token_ids, out.token_ids[:3])
    plain, sampler = run(rows[:2], logits[:2])
    assert sampler == GREEDY
    np.testing.assert_array_equal(plain.token_ids, out.token_ids[:2])


def test_penalties_exact():
    rng = np.random.default_rng(2)
    s, vocab = 5, 24
    logits = rng.normal(size=(s, vocab)).astype(np.float32) * 3
    params = [
        SamplingParams(repetition_penalty=1.5),
        SamplingParams(repetition_penalty=0.7),  # < 1 encourages repetition
        SamplingParams(frequency_penalty=0.8),
        SamplingParams(presence_penalty=-1.2),
        SamplingParams(repetition_penalty=1.3, frequency_penalty=0.5, presence_penalty=1.0),
    ]
    prompts = [list(rng.integers(0, vocab, size=n)) for n in (5, 3, 7, 0, 9)]
    outputs = [list(rng.integers(0, vocab, size=n)) for n in (4, 6, 10, 3, 11)]  # with repeats
    rows = [(p, 0, prompts[i], outputs[i], [0]) for i, p in enumerate(params)]
    a, sampler = build(rows, s, vocab)
    assert sampler == GENERAL
    got = jax.jit(apply_penalties)(
        jnp.asarray(logits),
        jnp.asarray(a.token_history),
        jnp.asarray(a.num_prompt_tokens),
        jnp.asarray(a.repetition_penalty),
        jnp.asarray(a.presence_penalty),
        jnp.asarray(a.frequency_penalty),
    )
    for i, p in enumerate(params):
        np.testing.assert_allclose(
            got[i], np_penalties(logits[i], prompts[i], outputs[i], p), rtol=1e-6, atol=1e-5
        )
    # Presence/frequency ignore the prompt: a prompt-only token keeps its logit in row 2.
    only_prompt = sorted(set(prompts[2]) - set(outputs[2]))
    np.testing.assert_array_equal(got[2, only_prompt], logits[2, only_prompt])


def test_penalties_shift_sampled_distribution():
    p = SamplingParams(temperature=1.0, frequency_penalty=0.5, presence_penalty=0.3)
    output = [0, 0, 1]
    rows = [(p, i, [], output, [EOS]) for i in range(N_DRAWS)]
    out, _ = run(rows, np.tile(LOGITS, (N_DRAWS, 1)))
    target = np_softmax(np_penalties(LOGITS, [], output, p))
    freq = np.bincount(out.token_ids, minlength=V) / N_DRAWS
    np.testing.assert_allclose(freq, target, atol=TOL)


def test_min_tokens_masks_eos_and_stop_ids():
    logits = np.full((1, V), -5.0, np.float32)
    logits[0, EOS] = 10.0  # EOS dominates,
    logits[0, 3] = 9.0  # then a stop token,
    logits[0, 1] = 1.0  # then an ordinary one.
    for temperature in (0.0, 1.0):
        p = SamplingParams(temperature=temperature, min_tokens=2, stop_token_ids=[3])
        rows = [(p, i, [], [], [EOS]) for i in range(200)]
        out, sampler = run(rows, np.tile(logits, (200, 1)))
        assert sampler == GENERAL
        assert not np.isin(out.token_ids, [EOS, 3]).any()
        # The mass moves to the best unmasked token.
        assert (out.token_ids == 1).sum() > 100
    # Once min_tokens outputs exist, EOS is allowed again.
    p = SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[3])
    assert run([(p, 0, [], [1, 1], [EOS])], logits)[0].token_ids[0] == EOS
    # ignore_eos: EOS is not a stop token, so min_tokens does not mask it (only the stop id).
    p = SamplingParams(temperature=0, min_tokens=2, ignore_eos=True, stop_token_ids=[3])
    assert run([(p, 0, [], [], [EOS])], logits)[0].token_ids[0] == EOS
    logits2 = logits.copy()
    logits2[0, EOS] = -5.0
    assert run([(p, 0, [], [], [EOS])], logits2)[0].token_ids[0] == 1


def test_logprobs_are_raw_and_top_k_matches_numpy():
    rng = np.random.default_rng(3)
    s, vocab = 6, 40
    logits = rng.normal(size=(s, vocab)).astype(np.float32) * 2
    params = [
        SamplingParams(temperature=0.5, top_k=3, repetition_penalty=1.5, logprobs=3),
        SamplingParams(temperature=0, logprobs=7),
        SamplingParams(temperature=1.0),
    ] * 2
    rows = [(p, i, [1, 2], [3], [0]) for i, p in enumerate(params)]
    out, sampler = run(rows, logits)
    assert sampler == GENERAL and out.top_logprobs.shape == (s, 20)
    ref = np_log_softmax(logits)
    np.testing.assert_allclose(
        out.logprobs, ref[np.arange(s), out.token_ids], rtol=1e-5, atol=1e-5
    )
    order = np.argsort(-ref, axis=-1)[:, :20]
    np.testing.assert_array_equal(out.top_token_ids, order)
    np.testing.assert_allclose(
        out.top_logprobs, np.take_along_axis(ref, order, -1), rtol=1e-5, atol=1e-5
    )
    # No logprobs requested, greedy: the greedy sampler's [S, 0] output, no top_k work.
    out, sampler = run([(SamplingParams(temperature=0, logprobs=0), 0, [], [], [0])], logits[:1])
    assert sampler == GREEDY and out.top_logprobs.shape == (1, 0)
    assert out.top_token_ids.shape == (1, 0)
    # A vocabulary smaller than 20: the top logprobs are all of it.
    out, _ = run([(SamplingParams(logprobs=20), 0, [], [], [0])], logits[:1, :8])
    assert out.top_logprobs.shape == (1, 8)


def test_token_logprobs_for_prompt_logprobs():
    rng = np.random.default_rng(4)
    logits = rng.normal(size=(5, 30)).astype(np.float32)
    target = np.array([0, 29, 3, 3, 17], np.int32)
    lp, top, ids = token_logprobs_jit(jnp.asarray(logits), jnp.asarray(target), k=5)
    ref = np_log_softmax(logits)
    np.testing.assert_allclose(lp, ref[np.arange(5), target], rtol=1e-5, atol=1e-5)
    order = np.argsort(-ref, axis=-1)[:, :5]
    np.testing.assert_array_equal(ids, order)
    np.testing.assert_allclose(top, np.take_along_axis(ref, order, -1), rtol=1e-5, atol=1e-5)


def test_general_sampler_equals_greedy_sampler_on_greedy_rows():
    """The general sampler gives greedy rows the greedy sampler's tokens and logprobs."""
    rng = np.random.default_rng(5)
    rows = [(SamplingParams(temperature=0), i, [1], [2], [0]) for i in range(3)]
    logits = rng.normal(size=(3, 16)).astype(np.float32)
    a, sampler_a = run(rows, logits)
    b, sampler_b = run(rows, logits, force_general=True)
    assert (sampler_a, sampler_b) == (GREEDY, GENERAL)
    np.testing.assert_array_equal(a.token_ids, b.token_ids)
    np.testing.assert_allclose(a.logprobs, b.logprobs)


def test_every_feature_is_data_one_compilation():
    """Batches switching on any mix of features reuse one compiled general sampler."""
    rng = np.random.default_rng(7)
    logits = jnp.asarray(rng.normal(size=(4, 16)).astype(np.float32))
    mixes = [
        [SamplingParams(temperature=0.9)],
        [SamplingParams(temperature=0.9, top_k=3), SamplingParams(temperature=0, logprobs=4)],
        [SamplingParams(top_p=0.5, min_p=0.1), SamplingParams(repetition_penalty=1.2, temperature=0)],
        [SamplingParams(min_tokens=3, stop_token_ids=[2]), SamplingParams(frequency_penalty=0.5, logprobs=20)],
    ]
    sample_fn = jax.jit(functools.partial(sample, sampler=GENERAL))
    for mix in mixes:
        rows = [(p, i, [1, 2], [3], [0]) for i, p in enumerate(mix)]
        inputs, sampler = build(rows, 4, 16)
        assert sampler == GENERAL
        sample_fn(logits, inputs)
    assert sample_fn._cache_size() == 1


def test_bf16_logits_and_extreme_values_are_finite():
    logits = jnp.asarray(np.array([[1e4, -1e4, 0, 3] + [0] * 4] * 2), jnp.bfloat16)
    rows = [(SamplingParams(temperature=0.01, top_p=0.5, logprobs=1), i, [], [], [0]) for i in range(2)]
    inputs, sampler = build(rows, 2, 8)
    out = sample_jit(logits, inputs, sampler=sampler)
    assert (np.asarray(out.token_ids) == 0).all()
    assert np.isfinite(np.asarray(out.logprobs)).all()


@pytest.mark.parametrize("top_k", [1, V, 100])
def test_top_k_edge_values(top_k):
    p = SamplingParams(temperature=1.0, top_k=top_k)
    rows = [(p, i, [], [], [EOS]) for i in range(500)]
    out, _ = run(rows, np.tile(LOGITS, (500, 1)))
    if top_k == 1:
        assert (out.token_ids == 0).all()
    else:  # k >= V is "off": every token can appear
        assert len(set(out.token_ids.tolist())) == V


def test_bisection_thresholds_match_sort_reference():
    """top_k/top_p masks (bisection) equal a numpy sort-based reference, ties and -inf included."""
    from jaxllm.sampling import _top_k_top_p_mask

    rng = np.random.default_rng(6)
    s, vocab = 64, 300
    logits = (rng.normal(size=(s, vocab)) * rng.uniform(0.1, 5, size=(s, 1))).astype(np.float32)
    logits[::4] = np.round(logits[::4])  # many ties
    logits[1::8, :50] = -np.inf  # already-masked tokens (e.g. min_tokens, min_p)
    logits[3, 7] = -3e38  # extreme finite values
    top_k = rng.integers(0, vocab + 20, size=s).astype(np.int32)
    top_k[::5] = 0
    top_p = rng.uniform(0.05, 1.0, size=s).astype(np.float32)
    top_p[::6] = 1.0
    got = np.asarray(
        jax.jit(_top_k_top_p_mask)(jnp.asarray(logits), jnp.asarray(top_k), jnp.asarray(top_p))
    )
    for i in range(s):
        x = logits[i].astype(np.float64)
        desc = np.sort(x)[::-1]
        k = top_k[i] if 0 < top_k[i] < vocab else vocab
        x = np.where(x < desc[k - 1], -np.inf, x)
        if top_p[i] < 1:
            probs = np_softmax(x)
            sp = np.sort(probs)[::-1]
            n_keep = max(1, int(((np.cumsum(sp) - sp) < top_p[i]).sum()))
            x = np.where(probs < sp[n_keep - 1], -np.inf, x)
        np.testing.assert_array_equal(np.isfinite(got[i]), np.isfinite(x), err_msg=f"row {i}")
        np.testing.assert_array_equal(got[i][np.isfinite(x)], logits[i][np.isfinite(x)])


def test_argmax_last_follows_jnp_argmax_ties_nan_and_infinities():
    """argmax_last (two plain reductions, fast on XLA:CPU) gives jnp.argmax's index exactly:
    the first of tied maxima, the first NaN, rows of -inf or of +inf, bf16."""
    from jaxllm.sampling import argmax_last

    x = jnp.asarray(np.random.default_rng(0).standard_normal((9, 1000)).astype(np.float32))
    x = (x.at[3, 100].set(jnp.nan).at[3, 50].set(jnp.nan).at[5, 7].set(jnp.max(x[5]))
         .at[6].set(-jnp.inf).at[7].set(jnp.inf).at[7, 3].set(-1.0).at[8, 999].set(99.0))
    for a in (x, x.astype(jnp.bfloat16)):
        got = np.asarray(jax.jit(argmax_last)(a))
        np.testing.assert_array_equal(got, np.asarray(jnp.argmax(a, axis=-1)))
        assert got.dtype == np.int32
