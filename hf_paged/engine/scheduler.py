"""Iteration-level FCFS scheduler: token budget, chunked prefill, admission by free blocks, preemption.

The unit of scheduling is a *group*: the sequences that must advance in lockstep (the beams of a beam search),
or a single sequence. Each step first advances running groups (decodes, unfinished prefills) in arrival order,
preempting the most recent running groups by recompute when blocks run out, then admits waiting groups while the
token budget, `max_num_seqs` and the free blocks allow, matching each new prompt against the prefix cache.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from hf_paged.blocks import BlockManager
from hf_paged.engine.request import Sequence, SequenceStatus


@dataclass(slots=True)
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    enable_chunked_prefill: bool = True
    enable_prefix_caching: bool = True
    preemption_mode: str = "recompute"  # or "swap": preempted KV moves to the CPU pool and comes back

    def __post_init__(self):
        if self.preemption_mode not in ("recompute", "swap"):
            raise ValueError(f"preemption_mode must be 'recompute' or 'swap', got {self.preemption_mode!r}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")


@dataclass(slots=True)
class ScheduledSeq:
    seq: Sequence
    num_tokens: int  # tokens computed this step, starting at seq.num_computed_tokens
    sample: bool  # this chunk reaches the end of the sequence: its logits are needed
    slots: list[int] = field(default_factory=list)


@dataclass(slots=True)
class SchedulerOutput:
    scheduled: list[ScheduledSeq]
    copies: list[tuple[int, int]]  # copy-on-write block pairs to apply before the forward
    preempted: list[Sequence]
    swap_out: list[tuple[int, int]] = field(default_factory=list)  # (device block, CPU block), before the forward
    swap_in: list[tuple[int, int]] = field(default_factory=list)  # (CPU block, device block), before the forward

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.scheduled)

    def order_decodes_longest_first(self) -> None:
        """A decode-only step's sequences by context, longest first (a stable sort: ties keep their order).

        NOTE: the forward's rows, and so the logits' and the sampled tokens' rows, follow `scheduled`; whoever
        reorders it does so before the step runs.
        """
        if len(self.scheduled) > 1 and all(item.num_tokens == 1 for item in self.scheduled):
            self.scheduled.sort(key=lambda item: -item.seq.num_computed_tokens)


class Scheduler:
    def __init__(self, config: SchedulerConfig, manager: BlockManager, cpu_manager: BlockManager | None = None):
        if config.preemption_mode == "swap" and cpu_manager is None:
            raise ValueError("preemption_mode='swap' needs swap space (a CPU block pool)")
        self.config = config
        self.manager = manager
        self.cpu_manager = cpu_manager if config.preemption_mode == "swap" else None
        self.waiting: deque[list[Sequence]] = deque()
        self.running: list[list[Sequence]] = []

    # ------------------------------------------------------------------------------------------ queues
    def add(self, group: list[Sequence]) -> None:
        for seq in group:
            seq.status = SequenceStatus.WAITING
        self.waiting.append(group)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def num_running_seqs(self) -> int:
        return sum(len(g) for g in self.running)

    def remove(self, seq: Sequence) -> None:
        """Take a finished or aborted sequence out of the queues and free its blocks."""
        for queue in (self.running, self.waiting):
            group = next((g for g in queue if seq in g), None)  # NOTE: a sequence is in one group at most
            if group is not None:
                group.remove(seq)
                if not group:
                    queue.remove(group)
                break
        self._release(seq)

    def _release(self, seq: Sequence) -> None:
        if seq.table is not None:
            self.manager.free(seq.table)
            seq.table = None
        if seq.swapped is not None:
            self.cpu_manager.free(seq.swapped)
            seq.swapped = None
        seq.num_computed_tokens = 0

    def _preempt(self, group: list[Sequence], out: SchedulerOutput) -> None:
        """Preempt a running group; it re-enters the front of the waiting queue.

        Swap mode (when the CPU pool has room): its blocks are copied to the CPU pool and come back on readmission.
        Otherwise recompute: its KV is dropped and recomputed from its tokens (the prefix cache may still hold it).
        """
        self.running.remove(group)
        cpu = self.cpu_manager
        swap = cpu is not None and sum(len(s.table.block_ids) for s in group) <= cpu.pool.num_free_blocks
        for seq in group:
            if swap:
                seq.swapped = cpu.new_table()
                cpu.append(seq.swapped, seq.table.num_tokens)
                out.swap_out.extend(zip(seq.table.block_ids, seq.swapped.block_ids))
                self.manager.free(seq.table)
                seq.table = None
            else:
                self._release(seq)
            seq.status = SequenceStatus.WAITING
            seq.num_preemptions += 1
        out.preempted.extend(group)
        self.waiting.appendleft(group)

    def _swap_in(self, group: list[Sequence], chunks: list[int], out: SchedulerOutput) -> bool:
        """Bring a swapped group's KV back (False, changing nothing, if the device pool cannot hold it yet)."""
        bs = self.manager.block_size
        needed = sum(-(-(seq.swapped.num_tokens + n) // bs) for seq, n in zip(group, chunks))
        if needed > self.manager.pool.num_free_blocks:
            return False
        for seq in group:
            seq.table = self.manager.new_table()
            self.manager.append(seq.table, seq.swapped.num_tokens)
            out.swap_in.extend(zip(seq.swapped.block_ids, seq.table.block_ids))
            self.cpu_manager.free(seq.swapped)
            seq.swapped = None
        return True

    # ------------------------------------------------------------------------------------------ the step
    def _chunks(self, group: list[Sequence], budget: int) -> list[int] | None:
        """Tokens each sequence of `group` computes this step within `budget` (None: nothing fits)."""
        if len(group) == 1:  # the common case, kept cheap: it runs for every running sequence at every step
            seq = group[0]
            want = 0 if seq.stops_at_pending else seq.num_uncomputed
            if want > budget and not self.config.enable_chunked_prefill:
                return None
            return [min(want, budget)]
        per_seq = budget // len(group)
        if per_seq < 1:
            return None
        wants = [0 if seq.stops_at_pending else seq.num_uncomputed for seq in group]
        if not self.config.enable_chunked_prefill and any(w > per_seq for w in wants):
            return None
        chunks = [min(w, per_seq) for w in wants]
        finishing = [c == w for c, w in zip(chunks, wants)]
        if any(finishing) and not all(finishing):
            # Lockstep: sequences of a group reach their end (and sample) in the same step.
            chunks = [min(c, w - 1) for c, w in zip(chunks, wants)]
        return chunks

    def _blocks_needed(self, group: list[Sequence], chunks: list[int]) -> int:
        if len(group) == 1:
            return self.manager.blocks_needed(group[0].table, chunks[0])
        return sum(self.manager.blocks_needed(seq.table, n) for seq, n in zip(group, chunks))

    def _commit(self, group, chunks, out: SchedulerOutput) -> None:
        for seq, n in zip(group, chunks):
            if n == 0:
                continue
            result = self.manager.append(seq.table, n)
            out.copies.extend(result.copies)
            sample = seq.num_computed_tokens + n == seq.num_tokens
            out.scheduled.append(ScheduledSeq(seq, n, sample, result.slots))

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput([], [], [])
        budget = self.config.max_num_batched_tokens
        pool = self.manager.pool

        # 1. Running groups, oldest first; make room by preempting the newest.
        i = 0
        while i < len(self.running) and budget > 0:
            group = self.running[i]
            chunks = self._chunks(group, budget)
            if chunks is None:
                break
            needed = self._blocks_needed(group, chunks)  # preempting other groups does not change it
            while needed > pool.num_free_blocks and self.running[-1] is not group:
                self._preempt(self.running[-1], out)
            if needed > pool.num_free_blocks:
                self._preempt(group, out)
                break
            self._commit(group, chunks, out)
            budget -= sum(chunks)
            i += 1

        # 2. Waiting groups, FCFS, while nothing had to be preempted this step.
        while self.waiting and budget > 0 and not out.preempted:
            group = self.waiting[0]
            if self.num_running_seqs() + len(group) > self.config.max_num_seqs:
                break
            if group[0].swapped is not None:
                chunks = self._chunks(group, budget)
                if chunks is None or not self._swap_in(group, chunks, out):
                    break
            for seq in group:
                if seq.table is None:
                    seq.table = self.manager.new_table()
                    if self.config.enable_prefix_caching:
                        seq.num_computed_tokens = self.manager.match_prefix(seq.table, seq.token_ids, seq.extra_keys)
                        seq.num_cached_tokens = max(seq.num_cached_tokens, seq.num_computed_tokens)
            chunks = self._chunks(group, budget)
            if chunks is None or self._blocks_needed(group, chunks) > pool.num_free_blocks:
                for seq in group:  # give back the prefix-cache hits; retry next step
                    self._release(seq)
                break
            self.waiting.popleft()
            self._commit(group, chunks, out)
            for seq in group:
                seq.status = SequenceStatus.RUNNING
            self.running.append(group)
            budget -= sum(chunks)
        return out

