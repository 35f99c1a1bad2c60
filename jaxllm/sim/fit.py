"""Fit a LinearCostModel to recorded steps with optax. The one jaxllm.sim module that imports
jax (for the optimiser); the simulate path never imports it.

    df = pandas.DataFrame([dataclasses.asdict(s) for s in records])      # StepStats rows
    model = fit_cost_model(df, costs, bytes_per_block=resolved.bytes_per_block, max_num_seqs=8)
    model.save("cost_model.json")

Each part of a step (host_before, device, host_after, between: see cost_model.PARTS) is a
non-negative linear function of its features, fitted separately. Coefficients are kept >= 0 by
a softplus; features and targets are scaled to O(1) first, so one optimiser setting fits FLOP
counts of 1e12 and row counts of 10 alike. The loss is the Huber loss with delta = one mean
step time: quadratic (the MEAN step time, which throughput and latencies add up) for steps within
a step time of the fit, linear beyond, so a stall of the shared machine (a step several times
its usual length) does not tilt every coefficient. Measured with experiments/sim_accuracy.py on
three recorded sets of runs: worst held-out error 8.1 / 7.9 / 27.7% against 8.6 / 10.9 / 27.5%
with the squared error; a small delta (0.1, near the median) gave 5.6 / 16.6 / 20.9%. (The
simulator's steps are then deterministic: a seeded draw from the measured spread was tried and
made tail latencies worse here, because much of that spread is the machine's load changing
between runs, not between steps.) A feature that never varies
from 0 in the data (e.g. swap_bytes without swaps) keeps its initial coefficient (`init`, e.g.
the RooflineCostModel of the measured machine, or 0).
"""

from __future__ import annotations

import numpy as np

from jaxllm.sim.cost_model import _F, FEATURES, PARTS, LinearCostModel, step_table
from jaxllm.sim.model_costs import ModelCosts


def fit_nonnegative(X: np.ndarray, y: np.ndarray, init: np.ndarray | None = None, num_iters: int = 3000,
                    huber_delta: float | None = None) -> np.ndarray:
    """Coefficients c >= 0 minimising the squared error of X @ c against y (Huber with
    `huber_delta`, in units of the mean target, to fit the typical step instead) with optax (Adam).

    X: [N, F] features, y: [N] targets, init: [F] starting coefficients (columns of X that are
    all zero keep theirs). Returns [F] float64.
    """
    import jax
    import jax.numpy as jnp
    import optax

    X = np.asarray(X, np.float64)
    y = np.asarray(y, np.float64)
    if X.ndim != 2 or y.shape != (X.shape[0],) or X.shape[0] == 0:
        raise ValueError(f"need X [N, F] and y [N] with N > 0, got {X.shape} and {y.shape}")
    num_features = X.shape[1]
    init = np.zeros(num_features) if init is None else np.asarray(init, np.float64)
    col_scale = np.abs(X).mean(axis=0)
    used = col_scale > 0
    y_scale = float(np.abs(y).mean()) or 1.0
    Xs = jnp.asarray(X[:, used] / col_scale[used], jnp.float32)
    ys = jnp.asarray(y / y_scale, jnp.float32)
    # Start from init where it is positive, else from an even share of the mean target.
    start = np.where(init[used] > 0, init[used] * col_scale[used] / y_scale, 1.0 / max(used.sum(), 1))
    theta0 = jnp.asarray(np.log(np.expm1(np.maximum(start, 1e-6))), jnp.float32)  # softplus^-1

    def loss(theta):
        c = jax.nn.softplus(theta)
        if huber_delta is None:
            return jnp.mean(optax.losses.squared_error(Xs @ c, ys))
        return jnp.mean(optax.losses.huber_loss(Xs @ c, ys, delta=huber_delta))

    # Adam with a decaying step: a handful of coefficients over O(1) features converges in a few
    # thousand steps (one jitted scan, ~2 s on a CPU); L-BFGS reaches the same optimum but its
    # line search compiles several times longer.
    opt = optax.adam(optax.exponential_decay(0.1, transition_steps=num_iters // 6, decay_rate=0.5))

    @jax.jit
    def run(theta):
        def body(carry, _):
            theta, state = carry
            value, grad = jax.value_and_grad(loss)(theta)
            updates, state = opt.update(grad, state, theta)
            return (optax.apply_updates(theta, updates), state), value
        (theta, _), _ = jax.lax.scan(body, (theta, opt.init(theta)), None, length=num_iters)
        return theta

    c_scaled = np.asarray(jax.nn.softplus(run(theta0)), np.float64)
    coef = init.copy()
    coef[used] = c_scaled * y_scale / col_scale[used]
    return coef


def fit_cost_model(steps, costs: ModelCosts, bytes_per_block: int, max_num_seqs: int,
                   init: LinearCostModel | None = None, meta: dict | None = None,
                   attention_backend: str = "reference", huber_delta: float | None = 1.0) -> LinearCostModel:
    """A LinearCostModel fitted to recorded steps (StepStats, their dicts, or a DataFrame of them).

    costs: the model's ModelCosts; bytes_per_block and max_num_seqs: the recorded engine's
    (ResolvedEngineConfig.bytes_per_block, SchedulerConfig.max_num_seqs); attention_backend: the
    one it ran, resolved (jaxllm.runner.resolve_attention_backend: "cpu" is the CPU default),
    kept in the model's meta so a simulation models the same attention; huber_delta: the Huber
    loss's delta in mean step times (see the module docstring), None: squared error.
    """
    X, targets = step_table(steps, costs, bytes_per_block, max_num_seqs, attention_backend=attention_backend)
    coefficients = {}
    for part, names in PARTS.items():
        y, valid = targets[part]
        idx = [_F[n] for n in names]
        start = init.coef[part][idx] if init is not None else None
        if valid.sum() < len(idx):
            raise ValueError(f"cost-model part {part!r}: {int(valid.sum())} usable steps for {len(idx)} "
                             f"coefficients; record a longer run")
        c = fit_nonnegative(X[valid][:, idx], y[valid], start, huber_delta=huber_delta)
        coefficients[part] = dict(zip(names, map(float, c)))
    info = {"num_steps": int(len(X)), "features": list(FEATURES), **(meta or {}),
            "attention_backend": attention_backend}
    return LinearCostModel(coefficients, info)
