"""The continuous-batching engine: requests, scheduler, sampler, model runner, and the LLM batch API."""

from hf_paged.engine.async_engine import AsyncLLMEngine
from hf_paged.engine.engine import EngineConfig, EngineStats, LLMEngine, RequestError, StepError
from hf_paged.engine.llm import LLM
from hf_paged.engine.params import BeamSearchParams, SamplingParams
from hf_paged.engine.request import CompletionOutput, RequestOutput

__all__ = [
    "LLM",
    "AsyncLLMEngine",
    "BeamSearchParams",
    "CompletionOutput",
    "EngineConfig",
    "EngineStats",
    "LLMEngine",
    "RequestError",
    "RequestOutput",
    "SamplingParams",
    "StepError",
]
