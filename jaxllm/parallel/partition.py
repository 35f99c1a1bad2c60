"""Pipeline stages: which contiguous layers each of the P stages runs. Host only (no jax).

    counts = stage_layer_counts(num_layers, P, partition=None)   # e.g. (3, 3, 2, 2)... see below
    plan = StagePlan.build(num_layers, P, partition)               # offsets, padding, masks

Even split by default, as vLLM's get_pp_indices: every stage gets num_layers // P layers and the
remainder goes one each to the stages *before* the last (the last stage also runs the final norm
and the LM head). An explicit partition (vLLM's VLLM_PP_LAYER_PARTITION, here the config field
ParallelConfig.pipeline_layer_partition) gives each stage's count.

SPMD needs every stage to run the same program over same-shaped arrays, so each stage holds
`layers_per_stage = max(counts)` layer slots; a stage with fewer layers has trailing *padding
slots*: zero weights and a KV cache that nothing reads, skipped by a mask (the residual stream
passes through unchanged). An even split of num_layers % P == 0 has no padding; an uneven one
costs (max(counts) - counts[s]) layers of weights and KV per stage s.
"""

from __future__ import annotations

import dataclasses


def stage_layer_counts(num_layers: int, pipeline_parallel_size: int, partition=None) -> tuple[int, ...]:
    """Layers per stage; ValueError naming the values when they cannot be split."""
    p = pipeline_parallel_size
    if not isinstance(p, int) or isinstance(p, bool) or p < 1:
        raise ValueError(f"pipeline_parallel_size must be a positive int, got {p!r}")
    if p > num_layers:
        raise ValueError(f"pipeline_parallel_size={p} exceeds num_layers={num_layers}: every stage needs a layer")
    if partition is not None:
        counts = tuple(partition)
        if len(counts) != p:
            raise ValueError(f"pipeline_layer_partition={counts} has {len(counts)} stages, "
                             f"pipeline_parallel_size={p}")
        if any(not isinstance(c, int) or isinstance(c, bool) or c < 1 for c in counts):
            raise ValueError(f"pipeline_layer_partition={counts}: every stage needs a positive int of layers")
        if sum(counts) != num_layers:
            raise ValueError(f"pipeline_layer_partition={counts} sums to {sum(counts)}, "
                             f"not num_layers={num_layers}")
        return counts
    base, extra = divmod(num_layers, p)
    counts = [base] * p
    for i in range(2, extra + 2):  # vLLM: the extra layers go to the stages before the last
        counts[-i] += 1
    return tuple(counts)


@dataclasses.dataclass(frozen=True)
class StagePlan:
    """The stage layout (a jit static). counts[s] layers run on stage s, global layers
    offsets[s] .. offsets[s] + counts[s] - 1, in local slots 0 .. counts[s] - 1 of
    layers_per_stage slots (the rest are padding)."""

    counts: tuple[int, ...]

    @classmethod
    def build(cls, num_layers: int, pipeline_parallel_size: int, partition=None) -> "StagePlan":
        return cls(stage_layer_counts(num_layers, pipeline_parallel_size, partition))

    @property
    def num_stages(self) -> int:
        return len(self.counts)

    @property
    def num_layers(self) -> int:
        return sum(self.counts)

    @property
    def layers_per_stage(self) -> int:
        return max(self.counts)

    @property
    def offsets(self) -> tuple[int, ...]:
        out, total = [], 0
        for c in self.counts:
            out.append(total)
            total += c
        return tuple(out)

    def global_layer(self, stage: int, slot: int) -> int | None:
        """The model layer in (stage, slot), None for a padding slot."""
        return self.offsets[stage] + slot if slot < self.counts[stage] else None

    def layers_of(self, stage: int) -> range:
        return range(self.offsets[stage], self.offsets[stage] + self.counts[stage])
