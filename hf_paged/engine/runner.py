"""Runs one scheduled step through the unmodified HF model as a packed [1, T] batch."""

from __future__ import annotations

import torch

from hf_paged.attention import PagedAttentionMetadata
from hf_paged.cache import PagedCache, StepPlan
from hf_paged.engine.scheduler import SchedulerOutput
from hf_paged.patches.generate import paged_attention


class ModelRunner:
    """Packs all scheduled tokens of all sequences into one forward (varlen packing with per-token positions)."""

    def __init__(self, model: torch.nn.Module, cache: PagedCache):
        self.model = model
        self.cache = cache
        self.device = model.get_input_embeddings().weight.device

    def _plan(self, out: SchedulerOutput) -> tuple[torch.Tensor, torch.Tensor, StepPlan, list[int]]:
        input_ids, positions, slots, cu, sample_index = [], [], [], [0], []
        for item in out.scheduled:
            seq, start = item.seq, item.seq.num_computed_tokens
            input_ids += seq.token_ids[start : start + item.num_tokens]
            positions += range(start, start + item.num_tokens)
            slots += item.slots
            cu.append(cu[-1] + item.num_tokens)
            if item.sample:
                sample_index.append(cu[-1] - 1)
        max_blocks = max(len(item.seq.table.block_ids) for item in out.scheduled)
        block_tables = torch.zeros((len(out.scheduled), max_blocks), dtype=torch.int32)
        for row, item in enumerate(out.scheduled):
            ids = item.seq.table.block_ids
            block_tables[row, : len(ids)] = torch.tensor(ids, dtype=torch.int32)
        dev = self.device
        metadata = PagedAttentionMetadata(
            block_tables=block_tables.to(dev),
            seq_lens=torch.tensor(
                [i.seq.num_computed_tokens + i.num_tokens for i in out.scheduled], dtype=torch.int32, device=dev
            ),
            cu_seqlens_q=torch.tensor(cu, dtype=torch.int32, device=dev),
            query_index=None,
            max_seqlen_q=max(i.num_tokens for i in out.scheduled),
        )
        plan = StepPlan(torch.tensor(slots, dtype=torch.long, device=dev), out.copies, metadata)
        ids = torch.tensor([input_ids], dtype=torch.long, device=dev)  # (1, T)
        pos = torch.tensor([positions], dtype=torch.long, device=dev)  # (1, T)
        return ids, pos, plan, sample_index

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> torch.Tensor:
        """Forward the step; returns float32 logits [num_sampling_seqs, vocab] in scheduling order.

        Sequences under different LoRA adapters run as separate packed forwards of the same step (one adapter per
        forward, through PEFT's `adapter_names`); the copy-on-write copies go with the first.
        """
        groups: dict[str | None, list] = {}
        for item in out.scheduled:
            groups.setdefault(item.seq.adapter, []).append(item)
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
        return logits[torch.tensor(wanted, dtype=torch.long, device=logits.device)]

    def _forward(self, out: SchedulerOutput, adapter: str | None) -> torch.Tensor:
        ids, pos, plan, sample_index = self._plan(out)
        keep = torch.tensor(sample_index or [0], dtype=torch.long, device=self.device)
        extra = {"adapter_names": [adapter]} if adapter is not None else {}
        self.cache.set_step(plan)
        try:
            with paged_attention(self.model):  # a no-op when LLM / AsyncLLMEngine switched it already
                logits = self.model(
                    input_ids=ids, position_ids=pos, cache=self.cache, use_cache=True, logits_to_keep=keep, **extra
                ).logits
        finally:
            self.cache.set_step(None)
        if not sample_index:
            return logits.new_empty((0, logits.shape[-1]), dtype=torch.float32)
        return logits[0].float()  # (num_sampling_seqs, V)
