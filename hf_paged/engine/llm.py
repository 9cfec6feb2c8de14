"""`LLM`: the batch API vLLM users know, over the continuous-batching engine."""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Sequence as Seq

import torch
from tqdm.auto import tqdm

from hf_paged.blocks import DEFAULT_BLOCK_SIZE
from hf_paged.engine.collector import frozen_heap
from hf_paged.engine.compiled import caches_latents, on_one_device
from hf_paged.engine.config import EngineConfig, EngineStats
from hf_paged.engine.engine import LLMEngine, RequestError
from hf_paged.engine.params import BeamSearchParams, SamplingParams
from hf_paged.engine.request import RequestOutput
from hf_paged.patches.generate import paged_attention

DEFAULT_CPU_KV_MEMORY = 256 * 2**20
GPU_MEMORY_UTILIZATION = 0.9

Prompt = str | list[int] | list[dict]


def _is_single_prompt(prompts) -> bool:
    if isinstance(prompts, str):
        return True
    if isinstance(prompts, Seq) and prompts and all(isinstance(t, int) for t in prompts):
        return True  # one list of token ids
    return isinstance(prompts, Seq) and bool(prompts) and all(isinstance(m, dict) for m in prompts)  # one chat


def default_kv_cache_memory(model) -> int:
    """On CUDA: 90% of the device's memory minus what is already in use; on CPU: an explicit 256 MiB."""
    device = model.get_input_embeddings().weight.device
    if device.type != "cuda":
        return DEFAULT_CPU_KV_MEMORY
    free, total = torch.cuda.mem_get_info(device)
    used = total - free
    return max(int(total * GPU_MEMORY_UTILIZATION) - used, 0)


def batch_defaults(model, server: bool = False) -> tuple[int, int]:
    """(max_num_seqs, max_num_batched_tokens) as vLLM picks them: on a GPU of >= 70 GiB that is not an A100
    (H100, H200, MI300X, ...) 1024 sequences and 16384 tokens a step (8192 for the server); elsewhere 256 and 8192."""
    device = model.get_input_embeddings().weight.device
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        if props.total_memory >= 70 * 2**30 and "a100" not in props.name.lower():
            return 1024, 8192 if server else 16384
    return 256, 8192


def compile_by_default(model) -> bool:
    """`LLM(compile_model=None)`: compile a plain model on one GPU. CPU models gain nothing measurable; quantized,
    PEFT (per-adapter forwards), multi-device and tensor-parallel models stay eager."""
    if model.get_input_embeddings().weight.device.type != "cuda":
        return False
    if getattr(model, "is_quantized", False) or hasattr(model, "peft_config"):
        return False
    if not on_one_device(model) or caches_latents(model):
        return False
    return not (torch.distributed.is_available() and torch.distributed.is_initialized())


def fuses_by_default(model) -> bool:
    """`LLM(fuse_projections=None)`: on a GPU (the fusion itself leaves out quantized, adapted and hooked layers);
    not under tensor parallelism, whose sharded layers must keep their own forwards."""
    if model.get_input_embeddings().weight.device.type != "cuda":
        return False
    return not (torch.distributed.is_available() and torch.distributed.is_initialized())


class LLM:
    """Continuous-batching generation with paged KV memory for a stock HF causal LM.

    Args:
        model: a loaded HF model (PEFT / bitsandbytes models included) or a local directory.
        tokenizer: a tokenizer, a local path, or None (taken from the model's directory when it is a path).
        block_size: tokens per KV block.
        kv_cache_memory: bytes for the KV pool (default: 90% of free GPU memory; 256 MiB on CPU).
        num_blocks: the pool size in blocks (overrides kv_cache_memory).
        max_num_seqs, max_num_batched_tokens: sequences running at once, and the token budget of one step (chunked
            prefill splits longer prompts). None: vLLM's defaults (`batch_defaults`): 1024 and 16384 on a GPU of
            70 GiB or more other than an A100, else 256 and 8192.
        enable_prefix_caching: share full KV blocks of identical prefixes across requests.
        preemption_mode: "recompute" (default) drops a preempted sequence's KV and recomputes it; "swap" copies it
            to a CPU pool of `swap_space` bytes and back (falling back to recompute when that pool is full).
        enable_cuda_graphs: on CUDA, decode steps replay CUDA graphs captured per batch-size bucket.
        async_scheduling: prepare step N+1 on the host while the device runs step N (same outputs; off: every
            step waits for its tokens before the next is scheduled).
        compile_model: torch.compile (inductor) every forward, the ones the CUDA graphs capture included, fusing
            the model's elementwise work around the paged ops; it compiles at construction (`LLMEngine.warm_up`).
            None (the default): on for a plain model on one GPU, off on CPU and for quantized, PEFT, multi-device
            and tensor-parallel models; if compiling fails, the engine warns and runs the model eagerly.
        enforce_eager: run every forward eagerly: no CUDA graphs, no compilation (vLLM's option).
        fuse_projections: run q/k/v and gate/up as one matmul each (their weights laid out as one tensor; the
            parameters stay views of it). None (the default): on for a model on a GPU.

    Example:
        >>> llm = hf_paged.LLM(model, tokenizer)
        >>> outs = llm.generate(["Hello", "The sky is"], hf_paged.SamplingParams(max_tokens=32))
        >>> outs[0].outputs[0].text
    """

    def __init__(
        self,
        model,
        tokenizer=None,
        block_size: int = DEFAULT_BLOCK_SIZE,
        kv_cache_memory: int | None = None,
        num_blocks: int | None = None,
        max_num_seqs: int | None = None,
        max_num_batched_tokens: int | None = None,
        enable_prefix_caching: bool = True,
        enable_chunked_prefill: bool = True,
        max_model_len: int | None = None,
        preemption_mode: str = "recompute",
        swap_space: int = 0,
        enable_cuda_graphs: bool = True,
        async_scheduling: bool = True,
        compile_model: bool | None = None,
        enforce_eager: bool = False,
        fuse_projections: bool | None = None,
    ):
        model, tokenizer = _load(model, tokenizer)
        if enforce_eager and compile_model:
            raise ValueError("enforce_eager=True runs the model eagerly: it cannot be combined with compile_model=True")
        if num_blocks is None and kv_cache_memory is None:
            kv_cache_memory = default_kv_cache_memory(model)
        default_seqs, default_tokens = batch_defaults(model)
        max_num_seqs = default_seqs if max_num_seqs is None else max_num_seqs
        max_num_batched_tokens = default_tokens if max_num_batched_tokens is None else max_num_batched_tokens
        auto_compile = compile_model is None and not enforce_eager
        compile_model = compile_by_default(model) if auto_compile else bool(compile_model)
        config = EngineConfig(block_size, num_blocks, kv_cache_memory, max_num_seqs, max_num_batched_tokens,
                              max_model_len, enable_prefix_caching, enable_chunked_prefill, preemption_mode, swap_space,
                              enable_cuda_graphs and not enforce_eager, async_scheduling, compile_model,
                              fuse_projections=fuses_by_default(model) if fuse_projections is None else fuse_projections)
        self.engine = LLMEngine(model.eval(), tokenizer, config)
        if compile_model:
            self._warm_up(fall_back=auto_compile)
        self.tokenizer = tokenizer
        self._ids = itertools.count()

    def _warm_up(self, fall_back: bool) -> None:
        """Compile (and capture) now, not inside the first batch; `fall_back`: if that fails, run eagerly."""
        try:
            with paged_attention(self.engine.model):
                self.engine.warm_up()
        except Exception as exc:
            if not fall_back:
                raise
            warnings.warn(f"torch.compile of the model failed, so it runs eagerly ({exc!r}); pass "
                          "compile_model=False to skip the attempt", RuntimeWarning, stacklevel=3)
            self.engine.disable_compile()

    def _prepare(self, prompt: Prompt):
        """Chat messages go through the tokenizer's chat template; strings and token ids pass as they are."""
        if isinstance(prompt, list) and prompt and all(isinstance(m, dict) for m in prompt):
            if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
                raise RequestError("chat messages need a tokenizer with a chat template")
            # Token ids straight from the template: re-encoding its text would add special tokens (BOS) twice.
            ids = self.tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)
            return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
        return prompt

    def _run(self, prompts, params_list, use_tqdm: bool, adapters=None) -> list[RequestOutput]:
        ids = []
        adapters = adapters if isinstance(adapters, list) else [adapters] * len(prompts)
        if len(adapters) != len(prompts):
            raise ValueError(f"{len(adapters)} adapters for {len(prompts)} prompts")
        try:
            for prompt, params, adapter in zip(prompts, params_list, adapters):
                request_id = f"llm-{next(self._ids)}"
                self.engine.add_request(request_id, self._prepare(prompt), params, adapter=adapter)
                ids.append(request_id)
        except Exception:
            for request_id in ids:  # a bad prompt queues nothing of the batch
                self.engine.abort(request_id)
            raise
        finished: dict[str, RequestOutput] = {}
        # One attention switch for the whole batch (switching walks every module: too slow to do per step).
        bar = tqdm(total=len(ids), desc="Processed prompts", disable=None if use_tqdm else True, unit="req")
        with bar, paged_attention(self.engine.model), frozen_heap():
            while self.engine.has_unfinished_requests():
                for output in self.engine.step(only_finished=True):
                    if output.finished:
                        finished[output.request_id] = output
                        bar.update(1)
        return [finished[i] for i in ids]

    def generate(
        self,
        prompts: Prompt | list[Prompt],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        use_tqdm: bool = True,
        adapter: str | list[str | None] | None = None,
    ) -> list[RequestOutput]:
        """Generate for every prompt (strings, token-id lists or chat message lists); outputs in input order.

        `use_tqdm`: a progress bar on a terminal (it stays silent when stderr is not a TTY).

        `adapter`: for a PeftModel with several LoRA adapters loaded, the adapter name for all prompts or one per
        prompt (None: the model's active adapter). Requests with different adapters share the batch.
        """
        if _is_single_prompt(prompts):
            prompts = [prompts]
        prompts = list(prompts)
        if not prompts:
            return []
        params = sampling_params or SamplingParams()
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError(f"{len(params_list)} sampling params for {len(prompts)} prompts")
        return self._run(prompts, params_list, use_tqdm, adapter)

    def chat(self, messages: list[dict] | list[list[dict]], sampling_params: SamplingParams | None = None,
             use_tqdm: bool = True) -> list[RequestOutput]:
        """Generate replies to one conversation or a list of conversations."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        return self.generate(list(conversations), sampling_params, use_tqdm)

    def beam_search(self, prompts: Prompt | list[Prompt], params: BeamSearchParams,
                    use_tqdm: bool = False) -> list[RequestOutput]:
        """Beam search per prompt; each output holds `beam_width` beams, best first (as HF generate returns)."""
        if _is_single_prompt(prompts):
            prompts = [prompts]
        prompts = list(prompts)
        return self._run(prompts, [params] * len(prompts), use_tqdm)

    def get_stats(self) -> EngineStats:
        return self.engine.stats()


def _load(model, tokenizer):
    if isinstance(model, str):
        from hf_paged.models import load_model

        loaded, loaded_tok = load_model(model)
        return loaded, tokenizer if tokenizer is not None else loaded_tok
    if isinstance(tokenizer, str):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer, local_files_only=True)
    return model, tokenizer
