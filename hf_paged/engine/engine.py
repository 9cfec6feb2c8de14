"""LLMEngine: add requests, step, abort. The loop is thin: schedule -> forward -> sample -> stop checks."""

from __future__ import annotations

import itertools
import warnings
from dataclasses import dataclass

import torch

from hf_paged.blocks import BlockManager, BlockPool
from hf_paged.cache import PagedCache
from hf_paged.engine.beam import BeamState
from hf_paged.engine.config import EngineConfig, EngineStats, StepError
from hf_paged.engine.cuda_graphs import MAX_GRAPH_BATCH
from hf_paged.engine.params import BeamSearchParams, SamplingParams
from hf_paged.engine.intake import RequestError, check_adapter, check_fits, encode_prompt
from hf_paged.engine.request import Request, RequestOutput, Sequence, SequenceStatus, request_output
from hf_paged.engine.runner import ModelRunner
from hf_paged.engine.sampler import SampledBatch, SamplingState
from hf_paged.engine.sampler import launch as launch_sampling
from hf_paged.engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from hf_paged.engine.stopping import check_stop, eos_token_ids
from hf_paged.kernels.ops import decode_longest_first
from hf_paged.patches.generate import reject_prompt_learning


@dataclass(slots=True)
class _InFlight:
    """A launched step whose sampled tokens the host has not read yet."""

    out: SchedulerOutput
    seqs: list[Sequence]  # the sampling sequences, in logits-row order
    logits: torch.Tensor | None  # kept for the synchronous path (beams, forks)
    sampled: SampledBatch | None  # the tokens chosen on the device (overlapped path)
    overlappable: bool  # NOTE: only an overlappable step stays in flight across step() calls

    @property
    def tokens(self) -> torch.Tensor | None:
        return self.sampled.tokens if self.sampled is not None else None


def packed_position_limit(text_config) -> int | None:
    """Llama4's NoPE layers scale queries by log(floor((p + 1) / floor_scale) + 1), reading p from the cache's
    length, which a packed engine step leaves at 0 (its tokens' index in the pack stands in for p): the same only
    while every position and every pack stays below floor_scale - 1. That bound, or None for other models."""
    if not getattr(text_config, "attn_temperature_tuning", False):
        return None
    if 0 not in (getattr(text_config, "no_rope_layers", None) or []):  # every layer has rope: no tuning applies
        return None
    return int(text_config.floor_scale) - 1


class LLMEngine:
    """Continuous batching over a stock HF causal LM with a PagedCache.

    Args:
        model: a loaded `PreTrainedModel` (PEFT and quantized models included), in eval mode.
        tokenizer: used to encode string prompts and decode outputs (optional with token-id prompts).
        config: block pool size and scheduling limits.
    """

    def __init__(self, model, tokenizer, config: EngineConfig):
        reject_prompt_learning(model)
        self.model, self.tokenizer, self.config = model, tokenizer, config
        dtype = model.dtype if model.dtype.is_floating_point else torch.float16
        budget = {"num_blocks": config.num_blocks} if config.num_blocks else {"kv_cache_memory": config.kv_cache_memory}
        self.cache = PagedCache(
            model.config, block_size=config.block_size, dtype=dtype,
            enable_prefix_caching=config.enable_prefix_caching, **budget,
        )
        if self.cache.kv_producers:
            raise ValueError(
                f"{type(model).__name__}: the engine does not support KV sharing between layers "
                "(num_kv_shared_layers); use model.generate(..., cache_implementation='paged')"
            )
        text_config = model.config.get_text_config(decoder=True)
        self.max_model_len = config.max_model_len or getattr(text_config, "max_position_embeddings", None) or 4096
        limit = packed_position_limit(text_config)
        if limit is not None and max(self.max_model_len, config.max_num_batched_tokens) > limit:
            warnings.warn(f"{type(model).__name__} scales its queries by their position (attn_temperature_tuning), "
                          "which a packed engine step does not tell it: max_model_len and max_num_batched_tokens are "
                          f"capped at {limit}, below which the scale is 1", RuntimeWarning, stacklevel=3)
            self.max_model_len = min(self.max_model_len, limit)
            config.max_num_batched_tokens = min(config.max_num_batched_tokens, limit)
        self.vocab_size = model.get_output_embeddings().weight.shape[0]
        cpu_manager = None
        if config.preemption_mode == "swap":
            num_cpu_blocks = config.swap_space // self.cache.bytes_per_block
            if num_cpu_blocks < 1:
                raise ValueError(f"swap_space={config.swap_space} bytes holds no block of "
                                 f"{self.cache.bytes_per_block} bytes")
            cpu_manager = BlockManager(BlockPool(num_cpu_blocks, enable_prefix_caching=False), config.block_size)
        self.scheduler = Scheduler(
            SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens, config.enable_chunked_prefill,
                            config.enable_prefix_caching, config.preemption_mode),
            self.cache.manager,
            cpu_manager,
        )
        self.num_swapped_out = 0
        self.runner = ModelRunner(model, self.cache, cuda_graphs=config.enable_cuda_graphs,
                                  compile_model=config.compile_model, fuse_projections=config.fuse_projections,
                                  max_batch=min(config.max_num_seqs, MAX_GRAPH_BATCH),
                                  max_blocks_per_seq=-(-self.max_model_len // config.block_size))
        self.requests: dict[str, Request] = {}
        self.longest_first = decode_longest_first()  # HF_PAGED_DECODE_ORDER (kernels/ops.py)
        self.eos_token_ids = eos_token_ids(model, tokenizer)
        self._seq_ids = itertools.count()
        self._inflight: _InFlight | None = None
        self.num_preemptions = self.prompt_tokens = self.generation_tokens = self.computed_tokens = 0

    # ------------------------------------------------------------------------------------------ requests
    def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams | BeamSearchParams,
        adapter: str | None = None,
    ) -> Request:
        """Queue a request; raises RequestError (and queues nothing) if it can never run.

        `adapter` names one of a PeftModel's loaded LoRA adapters for this request (None: the active one).
        """
        request = self.make_request(request_id, prompt, params, adapter)
        self.enqueue(request)
        return request

    def make_request(self, request_id: str, prompt, params, adapter: str | None = None) -> Request:
        """Validate and build a request without touching the engine's queues (safe from another thread)."""
        if request_id in self.requests:
            raise RequestError(f"request id {request_id!r} is already in use")
        if not isinstance(params, (SamplingParams, BeamSearchParams)):
            raise TypeError(f"params must be SamplingParams or BeamSearchParams, got {type(params).__name__}")
        text, prompt_ids = encode_prompt(prompt, self.tokenizer, self.vocab_size)
        width = params.beam_width if isinstance(params, BeamSearchParams) else params.n
        check_fits(len(prompt_ids), params.max_tokens, width, self.max_model_len, self.config.block_size,
                   self.cache.pool.num_blocks)
        check_adapter(self.model, adapter)
        # The adapter is part of the prefix-cache key: the same tokens under another adapter have other KV.
        extra_keys = (("adapter", adapter),) if adapter is not None else ()
        request = Request(request_id, text, prompt_ids, params, extra_keys=extra_keys, adapter=adapter)
        if isinstance(params, BeamSearchParams):
            request.beam = BeamState(params, len(prompt_ids), self.eos_token_ids)
        seq = self._new_sequence(request, 0, params if isinstance(params, SamplingParams) else None)
        request.sequences.append(seq)
        return request

    def enqueue(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise RequestError(f"request id {request.request_id!r} is already in use")
        self.requests[request.request_id] = request
        self.scheduler.add(list(request.sequences))

    def _new_sequence(self, request: Request, index: int, params: SamplingParams | None) -> Sequence:
        seq = Sequence(next(self._seq_ids), request.request_id, index, request.prompt_ids,
                       params or SamplingParams(max_tokens=request.params.max_tokens), arrival=request.arrival,
                       max_len=self.max_model_len,
                       extra_keys=request.extra_keys, adapter=request.adapter)
        if params is not None and params.seed is not None:
            seq.generator = torch.Generator(device=self.runner.device).manual_seed(params.seed + index)
        if params is not None and params.logprobs is not None:
            seq.logprobs = []
        return seq

    def abort(self, request_id: str) -> bool:
        """Stop a request and return all its blocks to the pool. False if it is unknown or already done."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return False
        for seq in request.sequences:
            if not seq.status.finished:
                seq.status, seq.finish_reason = SequenceStatus.FINISHED_ABORTED, "abort"
            self.scheduler.remove(seq)
        return True

    def warm_up(self) -> None:
        """Run two rounds of dummy requests through a prefill, a mixed and a decode step, so that compilation
        (`compile_model`) and CUDA-graph capture happen now instead of inside the first real batch.

        The first round allocates the pools (that forward runs eagerly); the second runs every path as a real batch
        would. Prefix caching is off meanwhile and the counters are reset after: nothing of it stays behind.
        """
        assert not self.requests, "warm up an idle engine"
        params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
        caching = self.config.enable_prefix_caching
        self.config.enable_prefix_caching = self.scheduler.config.enable_prefix_caching = False
        try:
            for round_ in range(2):
                self.add_request(f"warm-up-{round_}-a", [1] * 24, params)
                self.step()  # a prefill
                self.add_request(f"warm-up-{round_}-b", [2] * 8, params)  # then a mixed step, then decodes
                while self.has_unfinished_requests():
                    self.step()
        except BaseException:
            self._inflight = None
            for request_id in list(self.requests):  # a failed warm-up leaves no request or block behind
                self.abort(request_id)
            raise
        finally:
            self.config.enable_prefix_caching = self.scheduler.config.enable_prefix_caching = caching
        self.num_preemptions = self.prompt_tokens = self.generation_tokens = self.computed_tokens = 0

    def disable_compile(self) -> None:
        """Run the model eagerly from now on (after a failed compilation): CUDA graphs are captured again, eagerly."""
        self.config.compile_model = False
        self.runner.disable_compile()

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)  # NOTE: a request leaves only once its last token is read back

    # ------------------------------------------------------------------------------------------ the step
    def step(self, only_finished: bool = False) -> list[RequestOutput]:
        """Run one iteration; returns an output for every request that advanced (its final one when it finished).

        With `async_scheduling` (the default) the step is launched before the previous one's tokens are read back,
        so the host schedules and prepares step N+1 while the GPU runs step N; the outputs returned are then those
        of the previous step, and a finished request's last step may compute one token that is thrown away.
        `only_finished`: return the finished requests' outputs only (batch use: building and detokenizing every
        running request's output at every step is wasted work there).
        """
        touched: dict[str, Request] = {}
        out = self.scheduler.schedule()
        if self.longest_first:
            out.order_decodes_longest_first()
        self.num_preemptions += len(out.preempted)
        if out.swap_out or out.swap_in:
            cpu = self.scheduler.cpu_manager
            self.cache.swap(out.swap_out, out.swap_in, cpu.pool.num_blocks)
            self.num_swapped_out += len(out.swap_out)
        if not out.scheduled:
            touched.update(self._resolve())
            if not touched and self.scheduler.has_unfinished():
                raise RuntimeError("the scheduler could not schedule anything: the KV pool is too small")
        else:
            try:
                logits = self.runner.execute(out, self._inflight.tokens if self._inflight is not None else None)
            except Exception as exc:
                # The step's blocks hold no valid KV: drop its requests, keep the others running.
                touched.update(self._resolve())
                failed = list(dict.fromkeys(item.seq.request_id for item in out.scheduled))
                for request_id in failed:
                    self.abort(request_id)
                raise StepError(failed, exc) from exc
            launched = self._launch(out, logits)
            touched.update(self._resolve())
            self._inflight = launched
            if not (self.config.async_scheduling and launched.overlappable):
                touched.update(self._resolve())  # its tokens decide what the next step does (beams, forks, ...)
        return [request_output(r, self.tokenizer) for r in touched.values() if r.finished or not only_finished]

    def _launch(self, out: SchedulerOutput, logits: torch.Tensor) -> _InFlight:
        """Account for a forward just launched and start sampling it on the device (nothing waits here)."""
        self.computed_tokens += out.num_tokens
        sampled = []
        for item in out.scheduled:
            seq = item.seq
            seq.num_computed_tokens += item.num_tokens
            if seq.num_computed_tokens <= len(seq.prompt_ids):
                self.prompt_tokens += item.num_tokens
            if item.sample:
                sampled.append(seq)
        if not sampled or not all(self._overlappable(seq) for seq in sampled):
            return _InFlight(out, sampled, logits, None, overlappable=False)
        states = [SamplingState(s.params, s.prompt_ids, s.output_ids, s.generator, self.eos_token_ids)
                  for s in sampled]
        batch = launch_sampling(logits, states, agree=_agree_across_ranks)
        for row, seq in enumerate(sampled):
            seq.num_pending, seq.pending_row = seq.num_pending + 1, row  # the step in flight resolves next
        return _InFlight(out, sampled, None, batch, overlappable=True)

    def _overlappable(self, seq: Sequence) -> bool:
        """Whether the next step may be scheduled before this sequence's new token is known on the host."""
        request = self.requests.get(seq.request_id)
        params = seq.params
        return (
            request is not None
            and request.beam is None
            and not (params.n > 1 and not seq.output_ids and len(request.sequences) == 1)  # forks at its 1st token
            and not params.penalized
            # The next step's sampler counts the outputs without this step's token: min_tokens must be met already.
            and len(seq.output_ids) + seq.num_pending >= params.min_tokens
        )

    def _resolve(self) -> dict[str, Request]:
        """Read back the step in flight (the step's one wait for the GPU): new tokens, stop checks, outputs."""
        inflight, self._inflight = self._inflight, None
        if inflight is None:
            return {}
        touched: dict[str, Request] = {}
        if inflight.sampled is not None:
            for seq, result in zip(inflight.seqs, inflight.sampled.results()):
                seq.num_pending -= 1
                request = self.requests.get(seq.request_id)
                if request is None or seq.status.finished:
                    continue  # aborted, or stopped while this step ran: its token is thrown away
                self._append(seq, result)
                touched[seq.request_id] = request
        else:
            touched = self._process(inflight.seqs, inflight.logits)
        if self.config.enable_prefix_caching:
            manager = self.cache.manager
            for item in inflight.out.scheduled:
                seq = item.seq
                if (seq.table is not None and not seq.status.finished
                        and manager.has_uncached_full_blocks(seq.table, len(seq.prompt_ids) + len(seq.output_ids))):
                    manager.cache_full_blocks(seq.table, seq.token_ids, seq.extra_keys)
        for request in touched.values():
            if request.finished:
                self.requests.pop(request.request_id, None)
        return touched

    def _process(self, sampled: list[Sequence], logits: torch.Tensor) -> dict[str, Request]:
        """The synchronous path: beam search steps and first samples that fork a request into n sequences."""
        rows = {seq.seq_id: row for row, seq in enumerate(sampled)}  # logits rows, stopped sequences included
        sampled = [s for s in sampled if s.request_id in self.requests and not s.status.finished]
        touched: dict[str, Request] = {}
        beams = [s for s in sampled if self.requests[s.request_id].beam is not None]
        plain = [s for s in sampled if self.requests[s.request_id].beam is None]
        if plain:
            self._sample(plain, logits[[rows[s.seq_id] for s in plain]])
            touched.update((s.request_id, self.requests[s.request_id]) for s in plain)
        for request_id in dict.fromkeys(s.request_id for s in beams):
            request = self.requests[request_id]
            group = [s for s in beams if s.request_id == request_id]
            self._beam_step(request, group, logits[[rows[s.seq_id] for s in group]])
            touched[request_id] = request
        return touched

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor) -> None:
        # Parallel sampling: a request's first sample forks its prefilled sequence into n (prompt blocks shared).
        expanded, rows = [], []
        for row, seq in enumerate(seqs):
            request = self.requests[seq.request_id]
            family = [seq]
            if seq.params.n > 1 and not seq.output_ids and len(request.sequences) == 1:
                for index in range(1, seq.params.n):
                    child = self._new_sequence(request, index, seq.params)
                    child.table = self.cache.manager.fork(seq.table)
                    child.num_computed_tokens, child.num_cached_tokens = seq.num_computed_tokens, seq.num_cached_tokens
                    child.status = SequenceStatus.RUNNING
                    request.sequences.append(child)
                    self.scheduler.running.append([child])
                    family.append(child)
            expanded += family
            rows += [row] * len(family)
        states = [SamplingState(s.params, s.prompt_ids, s.output_ids, s.generator, self.eos_token_ids)
                  for s in expanded]
        results = launch_sampling(logits[rows], states, agree=_agree_across_ranks).results()
        for seq, result in zip(expanded, results):
            self._append(seq, result)

    def _append(self, seq: Sequence, result) -> None:
        seq.output_ids.append(result.token)
        seq.cumulative_logprob += result.logprob
        if seq.logprobs is not None:
            seq.logprobs.append(result.top_logprobs)
        self.generation_tokens += 1
        self._check_stop(seq, result.token)

    def _check_stop(self, seq: Sequence, token: int) -> None:
        if check_stop(seq, token, self.eos_token_ids, self.tokenizer, self.max_model_len):
            self.scheduler.remove(seq)

    def _beam_step(self, request: Request, group: list[Sequence], logits: torch.Tensor) -> None:
        state: BeamState = request.beam
        parents = state.step(logits)
        manager = self.cache.manager
        if state.done:
            for seq in group:
                seq.status = SequenceStatus.FINISHED_LENGTH
                seq.finish_reason = "length"
                self.scheduler.remove(seq)
            request.sequences = group
            return
        # The new beams fork their parents' tables (ref counts, no KV copied); then the old tables are released.
        new_seqs = []
        for k, parent in enumerate(parents):
            source = group[parent]
            seq = group[k] if k < len(group) else self._new_sequence(request, k, None)
            new_seqs.append((seq, manager.fork(source.table), source.num_computed_tokens, state.running[k]))
        for seq in group:
            manager.free(seq.table)
        running_group = next(g for g in self.scheduler.running if group[0] in g)
        running_group.clear()
        for seq, table, computed, tokens in new_seqs:
            seq.table, seq.num_computed_tokens, seq.output_ids = table, computed, list(tokens)
            seq.status = SequenceStatus.RUNNING
            running_group.append(seq)
        request.sequences = list(running_group)
        self.generation_tokens += len(new_seqs)

    def stats(self) -> EngineStats:
        pool = self.cache.pool
        return EngineStats(
            num_running=self.scheduler.num_running_seqs(),
            num_waiting=sum(len(g) for g in self.scheduler.waiting),
            blocks_in_use=pool.num_used_blocks,
            num_blocks=pool.num_blocks,
            prefix_cache_queries=pool.num_cache_queries,
            prefix_cache_hits=pool.num_cache_hits,
            num_preemptions=self.num_preemptions,
            prompt_tokens=self.prompt_tokens,
            generation_tokens=self.generation_tokens,
            computed_tokens=self.computed_tokens,
        )


def _agree_across_ranks(tokens: torch.Tensor) -> None:
    """Tensor parallelism: every rank runs the same scheduler, so every rank must take rank 0's sampled tokens."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    if torch.distributed.get_world_size() == 1:
        return
    torch.distributed.broadcast(tokens, src=0)
