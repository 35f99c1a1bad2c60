"""Host side of the research instruments: hidden-state capture and residual interventions.
Host only: never imports jax.

    SamplingParams(output_hidden_states=[0, -1])            # residual stream at layers 0 and L
    SamplingParams(residual_interventions={3: vector})      # add `vector` at the input of layer 3

Hidden-state index i means what transformers' `output_hidden_states=True` means by
`hidden_states[i]`: the residual stream at the input of layer i (i = 0: the embeddings), and
i = num_layers: after the final norm. Negative indices count from the end (-1 = num_layers).
An intervention at layer i adds its vector to the residual at the input of layer i, after that
layer's hidden state was captured (as transformers' forward pre-hook on `layers[i]`, whose
`hidden_states[i]` for i >= 1 is layer i-1's output); layer indices are in [0, num_layers),
negative ones count from the end (-1 = the last layer).

How a step carries them (all data, no per-request compilation):
* A step where some row intervenes or captures runs the *instrumented* variant of the jitted
  step (a jit static, so other steps pay nothing). It adds `residual_add[l, row(t)]` to token t's
  residual at the input of layer l (zeros for rows that do not intervene) and returns the stacked
  residuals [L + 1, T, H], which stay on the device.
* A second, small jitted gather picks only the asked (layer, token) pairs out of them, padded to a
  power-of-two count R, so only the capturing rows' states travel to the host ([R, H]).
"""

from __future__ import annotations

import dataclasses
import hashlib
import numbers

import numpy as np

# Capture counts (layer, token pairs) are padded to a power of two from this one up.
MIN_CAPTURE_BUCKET = 16


# ---------------------------------------------------------------- validation (SamplingParams / inputs)

def normalize_hidden_layers(layers) -> tuple[int, ...] | None:
    """SamplingParams.output_hidden_states -> a tuple of ints (range checked later, against the
    model, by `resolve_hidden_layers`); ValueError naming the value otherwise."""
    if layers is None:
        return None
    if isinstance(layers, (numbers.Integral, str, bytes)) or not hasattr(layers, "__iter__"):
        raise ValueError(f"output_hidden_states must be a list of layer indices, got {layers!r}")
    out = tuple(layers)
    if not out or any(isinstance(i, bool) or not isinstance(i, numbers.Integral) for i in out):
        raise ValueError(f"output_hidden_states must be a non-empty list of int layer indices, got {layers!r}")
    return tuple(int(i) for i in out)


def normalize_interventions(interventions) -> dict[int, np.ndarray] | None:
    """SamplingParams.residual_interventions -> {int layer: [H] float32 read-only array}.

    A vector must be one-dimensional, of a floating dtype (ints and bools are refused: they are
    almost always a mistake) and finite. Its length is checked against the model later."""
    if interventions is None:
        return None
    if not isinstance(interventions, dict):
        raise ValueError(f"residual_interventions must be a dict {{layer: vector}}, got {interventions!r}")
    out = {}
    for layer, vector in interventions.items():
        if isinstance(layer, bool) or not isinstance(layer, numbers.Integral):
            raise ValueError(f"residual_interventions: layer indices must be ints, got {layer!r}")
        v = np.asarray(vector)
        if v.ndim != 1 or not np.issubdtype(v.dtype, np.floating):
            raise ValueError(
                f"residual_interventions[{layer}] must be a 1-D floating vector, got shape {v.shape} "
                f"dtype {v.dtype}"
            )
        if not np.all(np.isfinite(v)):
            raise ValueError(f"residual_interventions[{layer}] has non-finite values")
        v = v.astype(np.float32)  # a copy: the caller may change theirs later
        v.flags.writeable = False
        out[int(layer)] = v
    return out


def resolve_hidden_layers(layers, num_layers: int) -> tuple[int, ...] | None:
    """Hidden-state indices in [-(L + 1), L] -> [0, L], in the order asked; ValueError naming
    the first one out of range."""
    if layers is None:
        return None
    bad = [i for i in layers if not -(num_layers + 1) <= i <= num_layers]
    if bad:
        raise ValueError(
            f"output_hidden_states index {bad[0]} is out of range: this model has {num_layers} "
            f"layers, so indices are in [{-(num_layers + 1)}, {num_layers}]"
        )
    return tuple(i % (num_layers + 1) for i in layers)


def resolve_interventions(interventions, num_layers: int, hidden_size: int) -> dict[int, np.ndarray] | None:
    """{layer in [-L, L): [H] vector} -> {layer in [0, L): vector}; ValueError naming a layer that
    does not exist, a vector of the wrong length, or two keys naming the same layer."""
    if not interventions:
        return None
    out: dict[int, np.ndarray] = {}
    for layer, v in interventions.items():
        if not -num_layers <= layer < num_layers:
            raise ValueError(
                f"residual_interventions layer {layer} does not exist: this model has {num_layers} "
                f"layers, so layers are in [{-num_layers}, {num_layers - 1}]"
            )
        if v.shape != (hidden_size,):
            raise ValueError(
                f"residual_interventions[{layer}] has {v.shape[0]} values, but the model's hidden "
                f"size is {hidden_size}"
            )
        if layer % num_layers in out:
            raise ValueError(f"residual_interventions names layer {layer % num_layers} twice")
        out[layer % num_layers] = v
    return out


def intervention_salt(cache_salt: str | None, interventions: dict[int, np.ndarray] | None) -> str | None:
    """The prefix-cache salt of a request: an intervened request's K/V differ from the plain
    ones for the same tokens, so its blocks are salted with a digest of its interventions (the
    same interventions still share blocks with each other)."""
    if not interventions:
        return cache_salt
    h = hashlib.sha256()
    for layer in sorted(interventions):
        h.update(layer.to_bytes(4, "little", signed=True))
        h.update(np.ascontiguousarray(interventions[layer], np.float32).tobytes())
    return f"{cache_salt or ''}|residual_interventions:{h.hexdigest()}"


# ---------------------------------------------------------------- per-request capture buffer

class HiddenStateBuffer:
    """The hidden states recorded for one request: [positions, K, H] float32, positions 0, 1, ...
    in order (a position recomputed after a preemption is recorded once). Grows by doubling, so
    recording N positions costs O(N) copies; `view(lo, hi)` hands out read-only views."""

    def __init__(self, layers: tuple[int, ...], hidden_size: int):
        self.layers = layers
        self._buf = np.zeros((16, len(layers), hidden_size), np.float32)
        self.num_positions = 0

    def append(self, states: np.ndarray) -> None:
        """states [n, K, H]: the next n positions."""
        n = states.shape[0]
        if self.num_positions + n > self._buf.shape[0]:
            cap = max(2 * self._buf.shape[0], self.num_positions + n)
            grown = np.zeros((cap,) + self._buf.shape[1:], np.float32)
            grown[: self.num_positions] = self._buf[: self.num_positions]
            self._buf = grown  # views handed out earlier keep the old (unchanged) rows
        self._buf[self.num_positions : self.num_positions + n] = states
        self.num_positions += n

    def view(self, lo: int, hi: int) -> np.ndarray:
        v = self._buf[lo : min(hi, self.num_positions)]
        v.flags.writeable = False
        return v


# ---------------------------------------------------------------- one step's instrument inputs

@dataclasses.dataclass(frozen=True)
class Capture:
    """Host bookkeeping of one row's capture in a step: rows [offset, offset + n * K) of the
    gathered states are positions first .. first + n - 1, layer-minor."""

    request_id: str
    offset: int
    first_position: int
    num_positions: int
    num_layers: int


@dataclasses.dataclass(frozen=True)
class InstrumentInputs:
    """What an instrumented step needs beyond the plain step (numpy)."""

    # [L, S, H] f32: added to every token of row s at the input of layer l. None: no row
    # intervenes (the runner passes a cached device-resident zero array instead).
    residual_add: np.ndarray | None
    capture_layers: np.ndarray  # [R] int32 hidden-state index in [0, L] of each captured pair
    capture_tokens: np.ndarray  # [R] int32 step token index of each captured pair (0: padding)
    captures: tuple[Capture, ...]  # host only: how the R gathered rows map back to requests
    num_captured: int  # real pairs (<= R)


def capture_bucket(n: int) -> int:
    """R for n captured (layer, token) pairs: the next power of two >= MIN_CAPTURE_BUCKET."""
    r = MIN_CAPTURE_BUCKET
    while r < n:
        r *= 2
    return r


def build_instrument_inputs(scheduled, instruments: dict, cu_q_lens: np.ndarray, num_rows_padded: int,
                            num_layers: int, hidden_size: int) -> InstrumentInputs | None:
    """InstrumentInputs for a step, or None when no scheduled request captures or intervenes.

    instruments: request_id -> (HiddenStateBuffer or None, {layer: [H] vector} or None), only for
    requests that have either. A request records the positions past those it has recorded
    already, so recomputing after a preemption records nothing twice.
    """
    rows = [(i, item, instruments[item.request.request_id]) for i, item in enumerate(scheduled)
            if item.request.request_id in instruments]
    if not rows:
        return None
    residual_add = None
    layers, tokens, captures = [], [], []
    for i, item, (buffer, interventions) in rows:
        if interventions:
            if residual_add is None:
                residual_add = np.zeros((num_layers, num_rows_padded, hidden_size), np.float32)
            for layer, v in interventions.items():
                residual_add[layer, i] = v
        if buffer is None:
            continue
        start = item.num_computed_tokens
        if start > buffer.num_positions:  # capturing requests skip the prefix cache: no gaps
            raise RuntimeError(f"request {item.request.request_id!r} would skip hidden states of "
                               f"positions {buffer.num_positions}..{start - 1}")
        first = max(start, buffer.num_positions)
        n = start + item.num_new_tokens - first
        if n <= 0:
            continue
        k = len(buffer.layers)
        captures.append(Capture(item.request.request_id, len(layers), first, n, k))
        t = cu_q_lens[i] + (first - start) + np.arange(n, dtype=np.int32)
        layers.extend(np.tile(np.asarray(buffer.layers, np.int32), n))
        tokens.extend(np.repeat(t, k))
    r = capture_bucket(len(layers)) if layers else 0
    capture_layers = np.zeros(r, np.int32)
    capture_tokens = np.zeros(r, np.int32)
    capture_layers[: len(layers)] = layers
    capture_tokens[: len(tokens)] = tokens
    return InstrumentInputs(residual_add, capture_layers, capture_tokens, tuple(captures), len(layers))


def collect_hidden_states(inputs: InstrumentInputs, hidden_states: np.ndarray, states: dict) -> None:
    """Append each capture's rows of the gathered hidden_states [R, H] to its request's buffer
    (states: request_id -> outputs.RequestState)."""
    for c in inputs.captures:
        if c.request_id not in states:  # aborted while its step was in flight (async scheduling)
            continue
        rows = hidden_states[c.offset : c.offset + c.num_positions * c.num_layers]
        states[c.request_id].hidden_states.append(rows.reshape(c.num_positions, c.num_layers, -1))
