"""CUDA graphs for decode steps: the whole HF forward of a decode batch replayed as one graph.

An eager decode step is host-bound (the unmodified HF model's Python launches ~30 kernels per layer, about two
thirds of a step; docs/benchmarks.md). Decode steps have one token per sequence, so their shapes depend only on
the batch size: each batch size bucket (1, 2, 4, 8, 16, 24, 32, ... up to max_num_seqs) gets one graph, reading
its inputs from preallocated buffers. All buckets are captured at the first decode step (largest first, sharing
one memory pool), as vLLM does at start-up, so no capture stalls a running batch. A batch is padded to its bucket;
padding rows store nothing (slot -1) and attend to one slot of block 0, and their logits are dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from hf_paged.attention import PagedAttentionMetadata
from hf_paged.cache import PagedCache, StepPlan
from hf_paged.transfer import block_table_rows, to_device


# The largest batch captured (vLLM's default cap too): larger decode batches run the forward without a graph,
# where the launch overhead is small next to the step.
MAX_GRAPH_BATCH = 512


def batch_buckets(max_batch: int, smallest: int = 1) -> list[int]:
    small = [b for b in (1, 2, 4, 8) if smallest <= b < max_batch]
    return small + list(range(16, max_batch, 8 if max_batch <= 64 else 16)) + [max_batch]


@dataclass(slots=True)
class _Graph:
    graph: torch.cuda.CUDAGraph
    logits: torch.Tensor  # (B, V) output of the captured forward


class DecodeGraphs:
    """Captured decode forwards per batch bucket, over one set of static input buffers."""

    def __init__(self, model, cache: PagedCache, max_batch: int, max_blocks_per_seq: int, forward,
                 smallest_bucket: int = 1):
        self.model, self.cache, self.forward = model, cache, forward
        self.buckets = batch_buckets(max_batch, smallest_bucket)
        device = model.get_input_embeddings().weight.device
        n = self.buckets[-1]
        # NOTE: inference tensors, 1-d, as the eager steps' inputs are: a compiled forward then sees the same
        # dispatch keys and strides on both paths and compiles once.
        with torch.inference_mode():
            self._allocate(n, max_blocks_per_seq, device)
        self.graphs: dict[int, _Graph] = {}
        self.pool = None

    def _allocate(self, n: int, max_blocks_per_seq: int, device: torch.device) -> None:
        self.input_ids = torch.zeros((n,), dtype=torch.long, device=device)
        self.positions = torch.zeros((n,), dtype=torch.long, device=device)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.long, device=device)
        self.block_tables = torch.zeros((n, max_blocks_per_seq), dtype=torch.int32, device=device)
        self.seq_lens = torch.ones((n,), dtype=torch.int32, device=device)
        self.cu_seqlens = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.keep = torch.arange(n, dtype=torch.long, device=device)

    def bucket(self, batch: int) -> int | None:
        return next((b for b in self.buckets if b >= batch), None)

    def _plan(self, b: int) -> tuple[torch.Tensor, torch.Tensor, StepPlan, torch.Tensor]:
        metadata = PagedAttentionMetadata(self.block_tables[:b], self.seq_lens[:b], self.cu_seqlens[: b + 1], None, 1)
        plan = StepPlan(self.slot_mapping[:b], [], metadata)
        return self.input_ids[:b][None], self.positions[:b][None], plan, self.keep[:b]  # (1, b) inputs

    def capture_all(self) -> None:
        """Capture every bucket now, largest first (they share one memory pool), so no capture happens mid-run.

        NOTE: the buffers are reset to padding first: the warm-up forwards of a capture really run, and a stale
        slot in a row past the batch would write K/V into another sequence's block.
        """
        self.input_ids.zero_()
        self.positions.zero_()
        self.slot_mapping.fill_(-1)
        self.seq_lens.fill_(1)
        self.block_tables.zero_()
        for b in sorted(self.buckets, reverse=True):
            if b not in self.graphs:
                self.graphs[b] = self._capture(b)

    def _capture(self, b: int) -> _Graph:
        ids, pos, plan, keep = self._plan(b)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm up (Triton compiles, allocator settles) outside the graph
                self.forward(ids, pos, plan, keep)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = self.forward(ids, pos, plan, keep)
        self.pool = graph.pool()
        return _Graph(graph, logits)

    def run(self, input_ids: list[int], positions: list[int], slots: list[int], tables: list[list[int]],
            fill=None) -> torch.Tensor:
        """Replay the bucket's graph for this decode batch; returns float32 logits [batch, V].

        `fill(ids)` may overwrite entries of the batch's device input ids (tokens still on the device).
        NOTE: only the batch's own block-table columns are refreshed; the kernels never read past a row's length.
        """
        batch = len(input_ids)
        b = self.bucket(batch)
        pad = b - batch
        step = np.empty((4, b), dtype=np.int64)  # ids, positions, slots, seq_lens: one host-to-device copy
        step[0] = input_ids + [0] * pad
        step[1] = positions + [0] * pad
        step[2] = slots + [-1] * pad
        step[3, :batch] = step[1, :batch] + 1
        step[3, batch:] = 1
        step = to_device(step, torch.long, self.input_ids.device)
        self.input_ids[:b].copy_(step[0])
        self.positions[:b].copy_(step[1])
        self.slot_mapping[:b].copy_(step[2])
        self.seq_lens[:b].copy_(step[3])
        rows = to_device(block_table_rows(tables), torch.int32, self.block_tables.device)  # (batch, width)
        self.block_tables[:batch, : rows.shape[1]].copy_(rows)
        if fill is not None:
            fill(self.input_ids[:batch])
        if b not in self.graphs:
            self.graphs[b] = self._capture(b)
        self.graphs[b].graph.replay()
        return self.graphs[b].logits[:batch].float()
