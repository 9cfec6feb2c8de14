"""hf_paged: PagedAttention KV memory for stock Hugging Face Transformers models.

``import hf_paged`` is the one line: it registers the "paged" attention and routes
``model.generate(..., cache_implementation="paged")`` to ordinary generate with a :class:`PagedCache`.
"""

from hf_paged import patches as _patches

_patches.apply()

from hf_paged.blocks import BlockManager, BlockPool, BlockPoolExhausted, BlockTable  # noqa: E402
from hf_paged.cache import CacheStats, PagedCache  # noqa: E402
from hf_paged.engine import (  # noqa: E402
    LLM,
    AsyncLLMEngine,
    BeamSearchParams,
    CompletionOutput,
    EngineConfig,
    LLMEngine,
    RequestError,
    RequestOutput,
    SamplingParams,
)

__version__ = "0.1.0"

__all__ = [
    "LLM",
    "AsyncLLMEngine",
    "BeamSearchParams",
    "CompletionOutput",
    "EngineConfig",
    "LLMEngine",
    "RequestError",
    "RequestOutput",
    "SamplingParams",
    "BlockManager",
    "BlockPool",
    "BlockPoolExhausted",
    "BlockTable",
    "CacheStats",
    "PagedCache",
    "__version__",
]
