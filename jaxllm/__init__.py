"""jaxllm: a JAX research engine for LLM inference (paged KV cache, continuous batching,
Pallas kernels, tensor parallelism), with vLLM's API.

Importing jaxllm does not import jax: the host side (scheduler, block manager, batch preparation)
stays jax-free, and `load_model` / `Model` are imported on first use.
"""

from jaxllm.beam_search import BeamSearchOutput, BeamSearchSequence
from jaxllm.config import CacheConfig, EngineConfig, ParallelConfig, SchedulerConfig
from jaxllm.engine import Engine
from jaxllm.llm import LLM
from jaxllm.request import CompletionOutput, RequestOutput
from jaxllm.sampling_params import BeamSearchParams, SamplingParams

__all__ = [
    "LLM",
    "Engine",
    "EngineConfig",
    "CacheConfig",
    "SchedulerConfig",
    "ParallelConfig",
    "SamplingParams",
    "BeamSearchParams",
    "BeamSearchOutput",
    "BeamSearchSequence",
    "RequestOutput",
    "CompletionOutput",
    "load_model",
    "Model",
]


def __getattr__(name):
    if name == "load_model":
        from jaxllm.models.loader import load_model

        return load_model
    if name == "Model":
        from jaxllm.model import Model

        return Model
    raise AttributeError(f"module 'jaxllm' has no attribute {name!r}")
