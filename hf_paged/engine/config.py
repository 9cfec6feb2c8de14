"""The engine's settings (`EngineConfig`), its counters (`EngineStats`) and the error of a failed step."""

from __future__ import annotations

from dataclasses import dataclass

from hf_paged.blocks import DEFAULT_BLOCK_SIZE


class StepError(RuntimeError):
    """The model failed during a step; the requests of that step were aborted (their blocks are free)."""

    def __init__(self, request_ids: list[str], cause: BaseException):
        super().__init__(f"the step running requests {request_ids} failed: {cause!r}")
        self.request_ids = request_ids


@dataclass(slots=True)
class EngineConfig:
    block_size: int = DEFAULT_BLOCK_SIZE
    num_blocks: int | None = None
    kv_cache_memory: int | None = None  # bytes; used when num_blocks is None
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    max_model_len: int | None = None
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    preemption_mode: str = "recompute"  # "swap": preempted KV goes to a CPU pool of `swap_space` bytes
    swap_space: int = 0
    enable_cuda_graphs: bool = True  # decode steps replay captured CUDA graphs (CUDA models only)
    async_scheduling: bool = True  # schedule step N+1 while the GPU runs step N (outputs come one step later)
    compile_model: bool = False  # torch.compile every forward, the CUDA-graph ones included (LLM: on a GPU)
    fuse_projections: bool = False  # q/k/v and gate/up as one matmul each (engine/fused.py; LLM: on a GPU)

    def __post_init__(self):
        if self.preemption_mode == "swap" and self.swap_space <= 0:
            raise ValueError("preemption_mode='swap' needs swap_space > 0 (bytes of CPU memory for preempted KV)")
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.num_blocks is None and self.kv_cache_memory is None:
            raise ValueError("give num_blocks or kv_cache_memory")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")


@dataclass(slots=True)
class EngineStats:
    num_running: int
    num_waiting: int
    blocks_in_use: int
    num_blocks: int
    prefix_cache_queries: int
    prefix_cache_hits: int
    num_preemptions: int
    prompt_tokens: int
    generation_tokens: int
    computed_tokens: int  # every token that went through the model (recomputation included)

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0
