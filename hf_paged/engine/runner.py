"""Runs one scheduled step through the unmodified HF model as a packed [1, T] batch."""

from __future__ import annotations

import warnings

import torch
import torch.fx.experimental._config

from hf_paged.attention import PagedAttentionMetadata
from hf_paged.cache import PagedCache, StepPlan
from hf_paged.engine.compiled import (CompiledLayers, caches_latents, compile_options, compile_scope,
                                      compiles_by_layer)
from hf_paged.engine.cuda_graphs import DecodeGraphs
from hf_paged.engine.fused import fuse_projections as fuse_projections_of
from hf_paged.engine.fused import fused_forwards
from hf_paged.engine.scheduler import SchedulerOutput
from hf_paged.kernels.ops import skinny_matmul
from hf_paged.patches.generate import paged_attention
from hf_paged.transfer import block_table_rows, to_device


class ModelRunner:
    """Packs all scheduled tokens of all sequences into one forward (varlen packing with per-token positions)."""

    def __init__(self, model: torch.nn.Module, cache: PagedCache, cuda_graphs: bool = False, max_batch: int = 64,
                 max_blocks_per_seq: int = 256, compile_model: bool = False, fuse_projections: bool = False):
        self.model = model
        # q/k/v and gate/up as one matmul each (engine/fused.py); before compiling, which then sees the fused code
        self.cache = cache
        self.device = model.get_input_embeddings().weight.device
        skinny = skinny_matmul()  # small decode steps' projections off cuBLAS (ops.linear decides per call)
        self.fused = fuse_projections_of(model, fuse=fuse_projections, skinny=skinny)
        self.graphs = None
        self.pending_tokens: torch.Tensor | None = None
        if caches_latents(model) and (compile_model or (cuda_graphs and self.device.type == "cuda")):
            warnings.warn(f"{type(model).__name__} caches latents (multi-head latent attention): its paged attention "
                          "runs in torch, so the engine runs it without CUDA graphs or compiled forwards",
                          RuntimeWarning, stacklevel=3)
            compile_model = cuda_graphs = False
        # torch.compile (inductor) fuses the model's elementwise work (norms, rotary, activations, residual adds)
        # between the paged ops, layer by layer with one graph shared by all layers (engine/compiled.py; the whole
        # forward as one graph when the layers cannot share, or with HF_PAGED_COMPILE_SCOPE=model). Every forward
        # of one adapter goes through it, the decode forwards the CUDA graphs capture included, with the
        # step-dependent sizes (tokens, sequences, block-table width) marked dynamic and at least 2 (_plan pads
        # them; the smallest graph bucket is 2): a size of 1 would specialise. Decode-only steps (max_seqlen_q ==
        # 1) pick another attention kernel: two compilations in all, both in warm_up.
        self.compiled_call = None
        if compile_model:
            if compiles_by_layer(model, cache):
                self.compiled_call = CompiledLayers(model, cache, self._call_model,
                                                    whole_model=compile_scope() == "model")
            else:
                self.compiled_call = torch.compile(self._call_model, options=compile_options(self.device))
        if cuda_graphs and self.device.type == "cuda":
            # A compiled forward specialises size 1: pad single-sequence decodes to 2 rows instead of compiling twice.
            self.graphs = DecodeGraphs(model, cache, max_batch, max_blocks_per_seq, self.decode_forward,
                                       smallest_bucket=2 if compile_model else 1)

    def disable_compile(self) -> None:
        """Forward eagerly from now on; the graphs captured from the compiled forward are dropped (recaptured at the
        next decode step)."""
        self.compiled_call = None
        if self.graphs is not None:
            self.graphs.graphs.clear()
            self.graphs.pool = None

    def _plan(self, out: SchedulerOutput, for_compile: bool = False
              ) -> tuple[torch.Tensor, torch.Tensor, StepPlan, list[int]]:
        """The packed inputs of a step. `for_compile`: sizes that can be 1 are padded to 2 (a dummy sequence of
        one token that stores nothing, a second block-table column), so a compiled forward never specialises."""
        input_ids, positions, slots, cu, sample_index = [], [], [], [0], []
        for item in out.scheduled:
            start = item.seq.num_computed_tokens
            input_ids += _step_tokens(item)
            positions += range(start, start + item.num_tokens)
            slots += item.slots
            cu.append(cu[-1] + item.num_tokens)
            if item.sample:
                sample_index.append(cu[-1] - 1)
        tables = [i.seq.table.block_ids for i in out.scheduled]
        seq_lens = [i.seq.num_computed_tokens + i.num_tokens for i in out.scheduled]
        if for_compile and len(tables) < 2:
            tables, seq_lens, cu = tables + [[0]], seq_lens + [1], cu + [cu[-1] + 1]
            input_ids, positions, slots = input_ids + [0], [*positions, 0], slots + [-1]
        rows = block_table_rows(tables, min_width=2 if for_compile else 1)
        max_seqlen_q = max(b - a for a, b in zip(cu, cu[1:]))
        if for_compile:  # compiled forwards see 1 (decode kernel) or 2 (prefill kernel, whose grid ignores it)
            max_seqlen_q = min(max_seqlen_q, 2)
        dev = self.device
        metadata = PagedAttentionMetadata(
            block_tables=to_device(rows, torch.int32, dev),
            seq_lens=to_device(seq_lens, torch.int32, dev),
            cu_seqlens_q=to_device(cu, torch.int32, dev),
            query_index=None,
            max_seqlen_q=max_seqlen_q,
            # NOTE: not in compiled forwards, where it would be one more specialisation to compile
            fresh=not for_compile and all(item.seq.num_computed_tokens == 0 for item in out.scheduled),
        )
        plan = StepPlan(to_device(slots, torch.long, dev), out.copies, metadata)
        ids = self._fill_pending(to_device(input_ids, torch.long, dev), out.scheduled, cu)[None]  # (1, T)
        pos = to_device(positions, torch.long, dev)[None]  # (1, T)
        return ids, pos, plan, sample_index

    def _fill_pending(self, ids: torch.Tensor, items: list, starts: list[int]) -> torch.Tensor:
        """Put the tokens still on the device (sampled by the step in flight) at their places in `ids` (T,)."""
        at = [start for item, start in zip(items, starts) if item.seq.num_pending]
        if at:
            assert self.pending_tokens is not None, "a pending token but no step in flight"
            rows = [item.seq.pending_row for item in items if item.seq.num_pending]
            src = self.pending_tokens.index_select(0, to_device(rows, torch.long, self.device))
            ids.index_copy_(0, to_device(at, torch.long, self.device), src)
        return ids

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput, pending_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Forward the step; returns float32 logits [num_sampling_seqs, vocab] in scheduling order.

        `pending_tokens`: the device tokens of the step in flight, for sequences whose last token is still there.
        Sequences under different LoRA adapters run as separate packed forwards of the same step (one adapter per
        forward, through PEFT's `adapter_names`); the copy-on-write copies go with the first.
        """
        self.pending_tokens = pending_tokens
        groups: dict[str | None, list] = {}
        for item in out.scheduled:
            groups.setdefault(item.seq.adapter, []).append(item)
        graphed = self._graph_ready(out, groups)
        if graphed and not self.graphs.graphs:
            self._capture_graphs()  # at the first decode step, while nothing is timed yet
            graphed = self.graphs is not None  # None: the forward could not be captured, every step runs eagerly
        if graphed:
            self.cache.apply_copies(out.copies)
            items = out.scheduled
            return self.graphs.run(
                [_step_tokens(i)[0] for i in items],
                [i.seq.num_computed_tokens for i in items],
                [i.slots[0] for i in items],
                [i.seq.table.block_ids for i in items],
                fill=lambda ids: self._fill_pending(ids, items, range(len(items))),
            )
        if len(groups) == 1:
            return self._forward(out, next(iter(groups)))
        parts, order = [], []
        copies = out.copies
        for adapter, items in groups.items():
            part = SchedulerOutput(items, copies, [])
            copies = []
            parts.append(self._forward(part, adapter))
            order += [item.seq.seq_id for item in items if item.sample]
        logits = torch.cat(parts)
        position = {seq_id: row for row, seq_id in enumerate(order)}
        wanted = [position[item.seq.seq_id] for item in out.scheduled if item.sample]
        return logits[to_device(wanted, torch.long, logits.device)]

    def _capture_graphs(self) -> None:
        """Capture the decode graphs, or run every step eagerly from now on when the model's forward cannot be
        captured: a module that reads a device value back on the host (bitsandbytes' int8 matmul checks its
        activations for outliers with `.any()`) or launches outside the capturing stream. The failed capture's
        forwards store nothing (every slot is -1), so the step runs eagerly as if graphs had been off."""
        try:
            self.graphs.capture_all()
        except RuntimeError as exc:  # torch.AcceleratorError (CUDA errors) included
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            warnings.warn(f"the decode CUDA graphs could not be captured, so decode steps run eagerly ({exc!r:.300}); "
                          "pass enable_cuda_graphs=False to skip the attempt", RuntimeWarning, stacklevel=3)
            self.graphs = None

    def _graph_ready(self, out: SchedulerOutput, groups: dict) -> bool:
        """Pure decode, one adapter, a bucket big enough, and pools allocated (never inside a capture)."""
        return (
            self.graphs is not None
            and list(groups) == [None]
            and all(item.num_tokens == 1 and item.sample for item in out.scheduled)
            and self.graphs.bucket(len(out.scheduled)) is not None
            and all(layer.is_initialized for layer in self.cache.layers)
        )

    def _forward(self, out: SchedulerOutput, adapter: str | None) -> torch.Tensor:
        compiled = (self.compiled_call is not None and adapter is None  # PEFT's per-adapter forwards stay eager
                    and all(layer.is_initialized for layer in self.cache.layers))  # the pools exist: no re-trace
        ids, pos, plan, sample_index = self._plan(out, for_compile=compiled)
        keep = sample_index or [0]
        if compiled:
            keep = (sample_index + [0, 0])[: max(2, len(sample_index))]  # >= 2 rows; the extra ones are dropped
        keep = to_device(keep, torch.long, self.device)
        extra = {"adapter_names": [adapter]} if adapter is not None else {}
        if compiled:
            logits = self._compiled_forward(ids, pos, plan, keep)
        else:
            logits = self._model_forward(ids, pos, plan, keep, extra)
        if not sample_index:
            return logits.new_empty((0, logits.shape[-1]), dtype=torch.float32)
        return logits[: len(sample_index)].float()  # (num_sampling_seqs, V)

    def _compiled_forward(self, ids, pos, plan: StepPlan, keep: torch.Tensor) -> torch.Tensor:
        """A forward through the compiled model, every step-dependent size marked dynamic (all of them >= 2)."""
        if plan.copies:  # copy-on-write before the forward, outside the graph (it would specialise on block ids)
            self.cache.apply_copies(plan.copies)
            plan = StepPlan(plan.slot_mapping, [], plan.metadata)
        meta = plan.metadata
        for tensor, dim in ((ids, 1), (pos, 1), (keep, 0), (plan.slot_mapping, 0), (meta.block_tables, 0),
                            (meta.block_tables, 1), (meta.seq_lens, 0), (meta.cu_seqlens_q, 0)):
            torch._dynamo.mark_dynamic(tensor, dim)
        # NOTE: without duck shaping, two sizes that happen to be equal in one step (tokens and sequences, say) are
        # not assumed equal, which would cost a recompilation at the first step where they differ.
        with torch.fx.experimental._config.patch(use_duck_shape=False):
            return self._model_forward(ids, pos, plan, keep, call=self.compiled_call)

    def decode_forward(self, ids, pos, plan: StepPlan, keep: torch.Tensor) -> torch.Tensor:
        """The forward the decode CUDA graphs capture: compiled when the runner compiles the model."""
        if self.compiled_call is None:
            return self._model_forward(ids, pos, plan, keep)
        return self._compiled_forward(ids, pos, plan, keep)

    def _model_forward(self, ids, pos, plan: StepPlan, keep: torch.Tensor, extra: dict | None = None,
                       call=None) -> torch.Tensor:
        """The HF model on a packed [1, T] batch with `plan`; returns logits [len(keep), V] (model dtype)."""
        self.cache.set_step(plan)
        try:
            with paged_attention(self.model), fused_forwards(self.fused):  # paged: a no-op under LLM.generate
                logits = (call or self._call_model)(ids, pos, keep, extra or {})
        finally:
            self.cache.set_step(None)
        return logits[0]

    def _call_model(self, ids, pos, keep, extra: dict) -> torch.Tensor:
        return self.model(input_ids=ids, position_ids=pos, cache=self.cache, use_cache=True, logits_to_keep=keep,
                          **extra).logits


def _step_tokens(item) -> list[int]:
    """The input ids of a scheduled chunk; 0 stands for a pending token (filled on the device)."""
    seq, start = item.seq, item.seq.num_computed_tokens
    if seq.num_pending:
        assert item.num_tokens == 1 and start == len(seq.prompt_ids) + len(seq.output_ids), "decoded alone"
        return [0]
    end, prompt = start + item.num_tokens, seq.prompt_ids
    if end <= len(prompt):
        return prompt[start:end]
    if start >= len(prompt):  # decode: no need to build prompt + output
        return seq.output_ids[start - len(prompt) : end - len(prompt)]
    return seq.token_ids[start:end]
