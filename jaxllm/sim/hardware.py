"""Hardware profiles: predict step times from first principles, for machines we do not have.

THESE ARE MODELS, NOT MEASUREMENTS. A profile holds a few datasheet (or micro-benchmarked)
numbers; RooflineCostModel turns a step's FLOPs and bytes into a time with the roofline rule

    device = max(FLOPs / (peak_flops * devices), bytes / (memory_bandwidth * devices))
             + tensor-parallel all-reduces + swap copies
    host   = step_overhead_s

bytes = every weight once + the K/V every row attends to. Real kernels reach a fraction of these
peaks (more so at small batch), so a profile's numbers are an optimistic bound unless measured:
`HardwareProfile.from_roofline` builds one from experiments/roofline.py's measurement of this
machine, and a LinearCostModel fitted to this machine's steps is the calibrated alternative.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from jaxllm.sim.cost_model import _F, StepTime
from jaxllm.sim.model_costs import ModelCosts

MODEL_NOT_MEASUREMENT = "model, not a measurement"


@dataclasses.dataclass(frozen=True)
class HardwareProfile:
    """Peak numbers of one accelerator (per device) and the per-step host overhead."""

    name: str
    peak_flops: float  # FLOP/s per device at the model's dtype (dense)
    memory_bandwidth: float  # B/s per device (HBM, or RAM for a CPU)
    step_overhead_s: float = 0.0  # host + launch seconds per step (scheduling, inputs, dispatch)
    device_count: int = 1  # tensor-parallel devices (ideal split of FLOPs, weights and K/V)
    interconnect_bandwidth: float | None = None  # B/s per device for the all-reduces (None: free)
    host_link_bandwidth: float | None = None  # B/s host <-> device for swap copies (None: free)
    memory_bytes: float | None = None  # per device, for sizing a KV cache (informative)
    source: str = "datasheet"  # where the numbers come from

    def __post_init__(self):
        for name in ("peak_flops", "memory_bandwidth"):
            _positive(getattr(self, name), name)
        for name in ("interconnect_bandwidth", "host_link_bandwidth", "memory_bytes"):
            if getattr(self, name) is not None:
                _positive(getattr(self, name), name)
        v = self.step_overhead_s
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise ValueError(f"step_overhead_s must be a number of seconds >= 0, got {v!r}")
        if isinstance(self.device_count, bool) or not isinstance(self.device_count, int) or self.device_count < 1:
            raise ValueError(f"device_count must be a positive int, got {self.device_count!r}")

    @classmethod
    def from_dict(cls, d: dict) -> "HardwareProfile":
        """From a dict (a JSON file's), refusing fields the profile does not have."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields)
        if unknown:
            raise ValueError(f"unknown hardware profile field(s) {unknown}; fields: {sorted(fields)}")
        return cls(**d)

    @classmethod
    def from_roofline(cls, roof: dict, name: str = "this machine", step_overhead_s: float = 0.0) -> "HardwareProfile":
        """From experiments/roofline.py's measure_roofline() result (matmul FLOP/s, read B/s)."""
        return cls(name=name, peak_flops=float(roof["matmul_flops"]), memory_bandwidth=float(roof["read_bandwidth"]),
                   step_overhead_s=step_overhead_s,
                   source=f"measured roofline ({roof.get('backend', '?')}: best of {roof.get('reps', '?')} reps)")

    def replace(self, **changes) -> "HardwareProfile":
        """A what-if copy (e.g. memory_bandwidth doubled); unknown fields are refused."""
        return HardwareProfile.from_dict({**dataclasses.asdict(self), **changes})


def _positive(v, name: str) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {v!r}")


# Datasheet peaks (dense, no sparsity), bf16. Predictions from them are a model, not a measurement.
PROFILES = {
    "tpu-v5e": HardwareProfile(
        "tpu-v5e", peak_flops=197e12, memory_bandwidth=819e9, step_overhead_s=1e-3,
        interconnect_bandwidth=200e9, host_link_bandwidth=32e9, memory_bytes=16 * 2**30,
        source="datasheet (Google Cloud TPU v5e: 197 TFLOP/s bf16, 819 GB/s HBM, 16 GiB)"),
    "h100-sxm": HardwareProfile(
        "h100-sxm", peak_flops=989e12, memory_bandwidth=3.35e12, step_overhead_s=1e-3,
        interconnect_bandwidth=450e9, host_link_bandwidth=64e9, memory_bytes=80e9,
        source="datasheet (NVIDIA H100 SXM: 989 TFLOP/s bf16 dense, 3.35 TB/s HBM3, 80 GB)"),
    "a100-80gb": HardwareProfile(
        "a100-80gb", peak_flops=312e12, memory_bandwidth=2.039e12, step_overhead_s=1e-3,
        interconnect_bandwidth=300e9, host_link_bandwidth=32e9, memory_bytes=80e9,
        source="datasheet (NVIDIA A100 80GB SXM: 312 TFLOP/s bf16, 2.04 TB/s HBM2e)"),
}


def get_profile(profile) -> HardwareProfile:
    """A HardwareProfile, a dict of its fields, or the name of a preset in PROFILES."""
    if isinstance(profile, HardwareProfile):
        return profile
    if isinstance(profile, dict):
        return HardwareProfile.from_dict(profile)
    if profile not in PROFILES:
        raise ValueError(f"unknown hardware profile {profile!r}; presets: {sorted(PROFILES)}")
    return PROFILES[profile]


class RooflineCostModel:
    """StepTime from a HardwareProfile and the model's costs (a model, not a measurement)."""

    name = "roofline"

    def __init__(self, profile, costs: ModelCosts):
        self.profile = get_profile(profile)
        self.costs = costs

    def predict(self, x: np.ndarray) -> StepTime:
        p, c, n = self.profile, self.costs, self.profile.device_count
        flops = x[_F["matmul_flops"]] + x[_F["lm_head_flops"]] + x[_F["attention_flops"]]
        bytes_read = c.weight_bytes + x[_F["kv_bytes"]]
        forward = max(flops / (p.peak_flops * n), bytes_read / (p.memory_bandwidth * n))
        if n > 1 and p.interconnect_bandwidth is not None:
            # Two all-reduces of the [T, H] activations per layer (after attention and after the MLP);
            # a ring moves 2 (n - 1) / n of the buffer per device.
            padded_tokens = x[_F["matmul_flops"]] / (2.0 * c.matmul_params)
            buffer = padded_tokens * c.hidden_size * c.dtype_bytes
            forward += 2 * c.num_layers * buffer * 2 * (n - 1) / n / p.interconnect_bandwidth
        swap = self.swap_seconds(x[_F["swap_bytes"]])
        return StepTime(host_before=float(p.step_overhead_s), forward=float(forward),
                        swap=swap, host_after=0.0, between=0.0)

    def swap_seconds(self, swap_bytes: float) -> float:
        bw = self.profile.host_link_bandwidth
        return 0.0 if bw is None else float(swap_bytes / (bw * self.profile.device_count))

    def describe(self) -> dict:
        return {"kind": MODEL_NOT_MEASUREMENT, **dataclasses.asdict(self.profile)}
