"""SimulatedEngine: the real Engine's host code (scheduler, policies, KV-cache manager, request
bookkeeping, step records) on a virtual clock, with a step-cost model in place of the device.
Host only: never imports jax.

    sim = SimulatedEngine(EngineConfig(model="..."), model="path/to/hf_dir", cost_model="h100-sxm")
    sim.add_request("a", {"prompt_token_ids": ids}, SamplingParams(max_tokens=64, ignore_eos=True))
    while sim.has_unfinished_requests():
        sim.step()                      # the clock advances by the predicted step time

It is an Engine: add_request (n > 1 included: child requests as the engine runs them),
abort_request, step, has_unfinished_requests, add_step_observer (the same StepStats, with
device_time / host_time predicted) and get_stats behave as the engine's do. What it cannot do is
compute logits: a request's tokens are stand-ins (distinct per request, never an EOS or stop id),
so requests end at max_tokens (or max_model_len), as in ignore_eos workloads. Replay
(`jaxllm.sim.replay`) instead feeds each request the tokens a recorded run produced.
"""

from __future__ import annotations

import itertools
from typing import Any

from jaxllm.config import EngineConfig
from jaxllm.engine import Engine, _DeviceTiming
from jaxllm.outputs import make_output
from jaxllm.sampling_params import SamplingParams
from jaxllm.sim.clock import VirtualClock
from jaxllm.sim.cost_model import LinearCostModel, StepShape, StepTime, step_features, uses_cpu_kernel
from jaxllm.sim.hardware import HardwareProfile, RooflineCostModel
from jaxllm.sim.model_costs import ModelCosts, model_config_from


class SimulatedRunner:
    """Stands where the ModelRunner stands: swap copies take the cost model's time, nothing compiles."""

    compile_seconds = 0.0
    num_compilations = 0
    num_compile_cache_hits = 0
    num_executables = 0

    def __init__(self, engine: "SimulatedEngine", attention_backend: str, matmul_backend: str | None):
        self._engine = engine
        self.step_variants_used: set = set()
        self.gather_variants_used: set = set()
        self.attention_backend = attention_backend  # what get_stats reports, as a real runner's
        self.matmul_backend = matmul_backend

    def swap(self, blocks_to_swap_out, blocks_to_swap_in) -> None:
        n = len(blocks_to_swap_out) + len(blocks_to_swap_in)
        if n:
            e = self._engine
            e.clock.advance(e.cost_model.swap_seconds(n * e.resolved.bytes_per_block))

    def kv_cache_lost(self) -> bool:
        return False

    def reset_kv_cache(self) -> None:
        pass


class SimulatedEngine(Engine):
    """An Engine whose steps take the time a cost model predicts, on a VirtualClock.

    Args:
      config: the EngineConfig the real engine would get (its `model` path is not loaded).
      model: a ModelConfig, a transformers config dict, or an HF directory / config.json (no
        weights are read); default: config.model.
      cost_model: a LinearCostModel (fitted), a RooflineCostModel, a HardwareProfile, or a preset
        name from jaxllm.sim.hardware.PROFILES ("h100-sxm", "tpu-v5e", ...): those two predict
        from first principles (a model, not a measurement).
      clock: a VirtualClock (default: one starting at 0).
      swap_available: whether the simulated backend has host memory for swap (the real engine
        drops the swap pool where the backend has none, e.g. some CPU builds).
      tokenizer: optional, for string prompts (and stop strings, then streamed as in the engine).
      stream_outputs: step() returns an output for every request that got a token, as the engine
        does. Off (the default, about twice as fast at scale) it returns outputs only for the
        requests that finished; every token's time is in their metrics either way. (With n > 1
        a parent's metrics are then its first sample to finish, not its first to get a token.)
    """

    def __init__(self, config: EngineConfig, model: Any = None, cost_model: Any = "h100-sxm",
                 clock: VirtualClock | None = None, swap_available: bool = True, tokenizer=None,
                 stream_outputs: bool = False):
        if not isinstance(config, EngineConfig):
            raise ValueError(f"config must be an EngineConfig, got {type(config).__name__}")
        self.config = config
        self.clock = clock if clock is not None else VirtualClock()
        self.mesh = None
        self.model = None  # no weights: the simulator never computes logits
        model_config = model_config_from(model if model is not None else config.model)
        self.resolved = config.resolve(model_config)
        if not swap_available and self.resolved.num_cpu_blocks:
            import dataclasses

            self.resolved = dataclasses.replace(self.resolved, num_cpu_blocks=0)
        self.costs = ModelCosts.from_config(model_config, config.dtype)
        if isinstance(cost_model, (str, dict, HardwareProfile)):
            cost_model = RooflineCostModel(cost_model, self.costs)
        if not hasattr(cost_model, "predict") or not hasattr(cost_model, "swap_seconds"):
            raise ValueError(f"cost_model must be a LinearCostModel, RooflineCostModel, HardwareProfile or "
                             f"profile name, got {cost_model!r}")
        self.cost_model = cost_model
        self.stream_outputs = stream_outputs
        attention_backend = self._attention_backend(config, cost_model)
        # The projections' backend of the engine a fitted cost model was measured on (its
        # coefficients include it); a profile's model knows none: None.
        matmul_backend = (getattr(cost_model, "meta", None) or {}).get("matmul_backend")
        self.runner = SimulatedRunner(self, attention_backend, matmul_backend)
        self._cpu_kernel = uses_cpu_kernel(attention_backend)
        self._init_host(model_config, tokenizer)
        self._scripts: dict[str, list[int]] = {}  # request_id -> tokens to "sample" (replay)
        self._fillers: dict[str, int] = {}  # request_id -> its stand-in token
        self._filler_ids = itertools.count(3)
        self._pending: StepTime | None = None  # this step's host_after / between, charged later
        self._previous_bucket: int | None = None  # the token bucket the last step ran in

    @staticmethod
    def _attention_backend(config: EngineConfig, cost_model) -> str:
        """The attention the simulated engine runs: the config's, where "auto" means the one a
        fitted cost model was measured with (its machine's default), else the reference. A fitted
        model only knows the attention it was measured with."""
        fitted = getattr(cost_model, "attention_backend", None)
        backend = config.attention_backend if config.attention_backend != "auto" else (fitted or "reference")
        if fitted is not None and uses_cpu_kernel(backend) != uses_cpu_kernel(fitted):
            raise ValueError(f"attention_backend={backend!r}, but the cost model was fitted to an engine running "
                             f"{fitted!r}: fit one to steps of that backend, or simulate with attention_backend='auto'")
        return backend

    # ------------------------------------------------------------------ requests

    def add_request(self, request_id, prompt, params: SamplingParams | None = None,
                    arrival_time: float | None = None, priority: int = 0, cache_salt: str | None = None,
                    output_token_ids: list[int] | None = None) -> None:
        """Engine.add_request, plus `output_token_ids`: the tokens this request will "sample"
        (replay of a recorded run; n must be 1). Without them it samples stand-in tokens."""
        if output_token_ids is not None:
            if params is not None and params.n != 1:
                raise ValueError(f"request {request_id!r}: output_token_ids need n == 1, got n={params.n}")
            if len(output_token_ids) == 0:
                raise ValueError(f"request {request_id!r}: output_token_ids is empty")
        super().add_request(request_id, prompt, params, arrival_time, priority, cache_salt)
        if output_token_ids is not None:
            self._scripts[str(request_id)] = [int(t) for t in output_token_ids]

    def _add_one(self, request_id, token_ids, text, params, arrival_time, priority, cache_salt) -> None:
        super()._add_one(request_id, token_ids, text, params, arrival_time, priority, cache_salt)
        # A stand-in token of its own, so n > 1 samples diverge (their blocks are not identical)
        # and nothing ever stops early.
        forbidden = set(self.eos_token_ids()) | set(params.stop_token_ids or ())
        vocab = self.model_config.vocab_size
        token = next(self._filler_ids) % vocab
        while token in forbidden:
            token = next(self._filler_ids) % vocab
        self._fillers[request_id] = token

    def _token(self, req) -> int:
        script = self._scripts.get(req.request_id)
        if script is not None and req.num_output_tokens < len(script):
            return script[req.num_output_tokens]
        return self._fillers[req.request_id]

    # ------------------------------------------------------------------ the loop

    def step(self):
        """Engine.step on the virtual clock: host work before the device, the forward, host work
        after it, then the loop's gap before the next step, each as the cost model predicts."""
        self._pending = None
        outputs = super().step()
        if self._pending is not None:
            self.clock.advance(self._pending.between)
            self._pending = None
        for out in outputs:
            if out.finished:
                self._scripts.pop(out.request_id, None)
        return outputs

    def _execute(self, plan, timing: _DeviceTiming) -> dict[str, int]:
        shape = StepShape.from_plan(plan.scheduled, self.resolved.token_buckets, self.config.scheduler.max_num_seqs,
                                    block_size=self.config.cache.block_size,
                                    previous_padded_tokens=self._previous_bucket,
                                    cpu_kernel=self._cpu_kernel)
        self._previous_bucket = shape.padded_tokens
        t = self.cost_model.predict(step_features(shape, self.costs, self.resolved.bytes_per_block))
        self.clock.advance(t.host_before)
        with timing:
            self.clock.advance(t.forward)
        self._pending = t
        self._count_prompt_tokens(plan.scheduled)
        token = self._token if self._scripts else (lambda req: self._fillers[req.request_id])
        sampled = {item.request.request_id: token(item.request) for item in plan.scheduled if item.samples}
        self.num_generated_tokens += len(sampled)
        return sampled

    def _make_outputs(self, plan, sampled, finished):
        if self.stream_outputs or self.tokenizer is not None:
            return super()._make_outputs(plan, sampled, finished)
        outputs = []
        for req in finished:
            out = make_output(req, self._states.pop(req.request_id))
            outputs.append(self._fan_in(out) if req.request_id in self._parent_of else out)
        return outputs, len(finished)

    def _notify_observers(self, *args) -> None:
        if self._pending is not None:  # host work after the tokens were sampled ends the record
            self.clock.advance(self._pending.host_after)
        super()._notify_observers(*args)

    def _fail_step(self, plan, error: Exception):
        # The only device is a cost model: a failure here is a simulator bug, not a device error
        # to survive (the real engine's recovery would hide it).
        raise error

    def abort_request(self, request_id) -> None:
        super().abort_request(request_id)
        self._scripts.pop(str(request_id), None)

    def advance_to(self, t: float) -> None:
        """Idle until time t (an arrival): nothing runs in between."""
        self.clock.advance_to(t)

    def warmup(self, step_variants=None) -> int:
        """Nothing to compile: returns 0 (so harness code that warms up engines runs unchanged)."""
        return 0

    def get_stats(self) -> dict:
        stats = super().get_stats()
        stats.update(simulated=True, cost_model=getattr(self.cost_model, "name", type(self.cost_model).__name__),
                     sim_time=self.clock())
        return stats
