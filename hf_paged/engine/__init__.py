"""The continuous-batching engine: requests, scheduler, sampler, model runner, and the LLM batch API."""

from hf_paged.engine.async_engine import AsyncLLMEngine
from hf_paged.engine.config import EngineConfig, EngineStats, StepError
from hf_paged.engine.engine import LLMEngine, RequestError
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
