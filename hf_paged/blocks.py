"""The memory layer: a pool of fixed-size KV blocks with ref counts, and per-sequence block tables.

Pure Python: it sees block ids and token ids, never tensors or requests. One block id names the same slot range
in every layer's KV pool, so one allocation serves all layers.

NOTE: invariants kept by every public method (checked by tests/blocks with hypothesis):
- a block is in the free queue iff its ref_cnt is 0;
- a block's ref_cnt equals the number of block tables holding it;
- block tables are append-only except `truncate`, and the last block is the only one that may be partial.
"""

from __future__ import annotations

import hashlib
import pickle
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

# Tokens per block. vLLM uses 16; at 8 the half-empty last block of each sequence wastes half as much (KV waste at
# the peak of 128 ShareGPT requests: 3.8% -> 1.8%), and the kernels gather K/V token by token through the block
# table, so their speed does not depend on it (the same throughput on the H200: docs/benchmarks.md).
DEFAULT_BLOCK_SIZE = 8


class BlockPoolExhausted(RuntimeError):
    """Raised when an allocation needs more free blocks than the pool has; nothing was changed."""

    def __init__(self, needed: int, free: int, total: int):
        super().__init__(
            f"KV block pool exhausted: needed {needed} free blocks, {free} of {total} are free. "
            "Give the cache a larger budget (num_blocks / kv_cache_memory), or run fewer sequences at once."
        )
        self.needed, self.free, self.total = needed, free, total


@dataclass(slots=True, eq=False)
class Block:
    block_id: int
    ref_cnt: int = 0
    # Hash of the full block's tokens (and its prefix), set once the block is full and registered for reuse.
    block_hash: bytes | None = None
    prev_free: Block | None = None
    next_free: Block | None = None


class FreeBlockQueue:
    """Doubly linked list of free blocks; its order is the eviction order (head = evicted first).

    O(1) `popleft`, `append` and `remove` from the middle (a prefix-cache hit takes a block out of the queue).
    """

    def __init__(self, blocks: Iterable[Block]):
        self._head = Block(-1)
        self._tail = Block(-1)
        self._head.next_free, self._tail.prev_free = self._tail, self._head
        self.num_free = 0
        for block in blocks:
            self.append(block)

    def popleft(self) -> Block:
        block = self._head.next_free
        assert block is not self._tail, "popleft from an empty free queue"
        self.remove(block)
        return block

    def remove(self, block: Block) -> None:
        assert block.prev_free is not None and block.next_free is not None, f"block {block.block_id} is not free"
        block.prev_free.next_free = block.next_free
        block.next_free.prev_free = block.prev_free
        block.prev_free = block.next_free = None
        self.num_free -= 1

    def append(self, block: Block) -> None:
        last = self._tail.prev_free
        last.next_free, block.prev_free = block, last
        block.next_free, self._tail.prev_free = self._tail, block
        self.num_free += 1

    def block_ids(self) -> list[int]:
        ids, node = [], self._head.next_free
        while node is not self._tail:
            ids.append(node.block_id)
            node = node.next_free
        return ids


def hash_block_tokens(parent_hash: bytes | None, token_ids: Sequence[int], extra_keys: tuple = ()) -> bytes:
    """Content hash of a full block: its parent's hash, its token ids and extra keys (e.g. a LoRA adapter name)."""
    payload = pickle.dumps((parent_hash, tuple(token_ids), extra_keys), protocol=5)
    return hashlib.sha256(payload).digest()


class BlockPool:
    """A fixed number of KV blocks with ref counts, an LRU free queue and a prefix-hash -> block map.

    Args:
        num_blocks: blocks in the pool.
        enable_prefix_caching: keep freed full blocks findable by hash until they are reallocated.
    """

    def __init__(self, num_blocks: int, enable_prefix_caching: bool = True):
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_queue = FreeBlockQueue(self.blocks)
        self.cached: dict[bytes, Block] = {}
        self.num_cache_queries = 0
        self.num_cache_hits = 0

    @property
    def num_free_blocks(self) -> int:
        return self.free_queue.num_free

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.free_queue.num_free

    def ref_cnt(self, block_id: int) -> int:
        return self.blocks[block_id].ref_cnt

    def allocate(self, n: int) -> list[int]:
        """Take `n` blocks from the head of the free queue (evicting their cached hashes)."""
        if n > self.free_queue.num_free:
            raise BlockPoolExhausted(n, self.free_queue.num_free, self.num_blocks)
        ids = []
        for _ in range(n):
            block = self.free_queue.popleft()
            self.uncache_block(block.block_id)
            assert block.ref_cnt == 0, f"free block {block.block_id} has ref_cnt {block.ref_cnt}"
            block.ref_cnt = 1
            ids.append(block.block_id)
        return ids

    def incref(self, block_ids: Iterable[int]) -> None:
        """Share blocks (fork, prefix hit): ref_cnt up; a free block leaves the free queue."""
        for block_id in block_ids:
            block = self.blocks[block_id]
            if block.ref_cnt == 0:
                self.free_queue.remove(block)
            block.ref_cnt += 1

    def free(self, block_ids: Iterable[int]) -> None:
        """Drop one reference to each block; blocks reaching 0 go to the tail of the free queue, in the order given."""
        for block_id in block_ids:
            block = self.blocks[block_id]
            assert block.ref_cnt > 0, f"double free of block {block_id}"
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self.free_queue.append(block)

    def cache_block(self, block_id: int, block_hash: bytes) -> None:
        """Register a full block under its content hash so later sequences can share it."""
        if not self.enable_prefix_caching:
            return
        block = self.blocks[block_id]
        assert block.ref_cnt > 0, f"caching unowned block {block_id}"
        if block.block_hash is None and block_hash not in self.cached:
            block.block_hash = block_hash
            self.cached[block_hash] = block

    def uncache_block(self, block_id: int) -> None:
        """Forget a block's hash (its content is about to change in place)."""
        block = self.blocks[block_id]
        if block.block_hash is not None:
            if self.cached.get(block.block_hash) is block:
                del self.cached[block.block_hash]
            block.block_hash = None

    def lookup(self, block_hash: bytes) -> int | None:
        """The block holding this content, if cached (counted in the hit rate)."""
        self.num_cache_queries += 1
        block = self.cached.get(block_hash)
        if block is None:
            return None
        self.num_cache_hits += 1
        return block.block_id


@dataclass(slots=True)
class BlockTable:
    """One sequence's logical-to-physical block map.

    `num_tokens` is how many tokens of KV the sequence holds; slot of token i = block_ids[i // bs] * bs + i % bs.
    """

    block_size: int
    block_ids: list[int] = field(default_factory=list)
    num_tokens: int = 0
    # Hashes of the leading full blocks already registered in the prefix cache.
    block_hashes: list[bytes] = field(default_factory=list)

    def slot(self, position: int) -> int:
        return self.block_ids[position // self.block_size] * self.block_size + position % self.block_size

    def num_blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)


@dataclass(slots=True)
class AppendResult:
    slots: list[int]
    # Copy-on-write: (src, dst) block pairs whose KV must be copied before the new slots are written.
    copies: list[tuple[int, int]]


class BlockManager:
    """Block-table operations over one pool: append with copy-on-write, fork, truncate, free, prefix lookup."""

    def __init__(self, pool: BlockPool, block_size: int):
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.pool = pool
        self.block_size = block_size

    def new_table(self) -> BlockTable:
        return BlockTable(self.block_size)

    def blocks_needed(self, table: BlockTable, num_new_tokens: int) -> int:
        """Free blocks an `append` of `num_new_tokens` would take, copy-on-write included."""
        bs = self.block_size
        needed = table.num_blocks_needed(table.num_tokens + num_new_tokens) - len(table.block_ids)
        if num_new_tokens > 0 and table.num_tokens % bs and self.pool.ref_cnt(table.block_ids[-1]) > 1:
            needed += 1
        return needed

    def append(self, table: BlockTable, num_new_tokens: int) -> AppendResult:
        """Grow `table` by `num_new_tokens` slots. A shared, partial last block is copied first (copy-on-write).

        Raises BlockPoolExhausted (and changes nothing) if the pool cannot supply the blocks.
        """
        bs = self.block_size
        if num_new_tokens == 1 and table.num_tokens % bs and self.pool.ref_cnt(table.block_ids[-1]) == 1:
            # A decode step into the room left in its own last block: nothing to allocate or copy.
            slot = table.slot(table.num_tokens)
            table.num_tokens += 1
            return AppendResult([slot], [])
        needed = self.blocks_needed(table, num_new_tokens)
        if needed > self.pool.num_free_blocks:
            raise BlockPoolExhausted(needed, self.pool.num_free_blocks, self.pool.num_blocks)
        copies = []
        if num_new_tokens > 0 and table.num_tokens % bs and self.pool.ref_cnt(table.block_ids[-1]) > 1:
            src = table.block_ids[-1]
            (dst,) = self.pool.allocate(1)
            self.pool.free([src])
            table.block_ids[-1] = dst
            copies.append((src, dst))
        new_total = table.num_tokens + num_new_tokens
        grow = table.num_blocks_needed(new_total) - len(table.block_ids)
        if grow > 0:
            table.block_ids.extend(self.pool.allocate(grow))
        slots = [table.slot(p) for p in range(table.num_tokens, new_total)]
        table.num_tokens = new_total
        return AppendResult(slots, copies)

    def fork(self, table: BlockTable) -> BlockTable:
        """A child table sharing every block of `table` (ref counts up, no KV copied)."""
        self.pool.incref(table.block_ids)
        return BlockTable(self.block_size, list(table.block_ids), table.num_tokens, list(table.block_hashes))

    def free(self, table: BlockTable) -> None:
        """Release a table's blocks, tail first, so a long prefix's tail is evicted before its head."""
        self.pool.free(reversed(table.block_ids))
        table.block_ids.clear()
        table.block_hashes.clear()
        table.num_tokens = 0

    def truncate(self, table: BlockTable, num_tokens: int) -> None:
        """Keep only the first `num_tokens` tokens (assisted decoding's rollback)."""
        if not 0 <= num_tokens <= table.num_tokens:
            raise ValueError(f"cannot truncate a {table.num_tokens}-token table to {num_tokens} tokens")
        keep = table.num_blocks_needed(num_tokens)
        self.pool.free(reversed(table.block_ids[keep:]))
        del table.block_ids[keep:]
        del table.block_hashes[num_tokens // self.block_size :]
        table.num_tokens = num_tokens
        # NOTE: a kept block that became partial will be written again; if this table owns it alone it must leave
        # the prefix cache (a shared one is copied on write instead).
        if num_tokens % self.block_size and self.pool.ref_cnt(table.block_ids[-1]) == 1:
            self.pool.uncache_block(table.block_ids[-1])

    def has_uncached_full_blocks(self, table: BlockTable, num_known_tokens: int) -> bool:
        """Whether `cache_full_blocks` would register anything (a cheap test before building the token list)."""
        return min(table.num_tokens, num_known_tokens) // self.block_size > len(table.block_hashes)

    def cache_full_blocks(self, table: BlockTable, token_ids: Sequence[int], extra_keys: tuple = ()) -> None:
        """Hash and register the table's full blocks not yet registered (`token_ids`: the sequence's tokens)."""
        bs = self.block_size
        num_full = min(table.num_tokens, len(token_ids)) // bs
        for i in range(len(table.block_hashes), num_full):
            parent = table.block_hashes[-1] if table.block_hashes else None
            block_hash = hash_block_tokens(parent, token_ids[i * bs : (i + 1) * bs], extra_keys)
            self.pool.cache_block(table.block_ids[i], block_hash)
            table.block_hashes.append(block_hash)

    def match_prefix(self, table: BlockTable, token_ids: Sequence[int], extra_keys: tuple = ()) -> int:
        """Point an empty table at the cached blocks of the longest cached full-block prefix of `token_ids`.

        Returns the number of tokens whose KV is already computed. At least one token is always left to compute,
        so the model produces logits for the last prompt token.
        """
        assert table.num_tokens == 0 and not table.block_ids, "match_prefix needs an empty table"
        bs = self.block_size
        parent = None
        for i in range((len(token_ids) - 1) // bs):
            block_hash = hash_block_tokens(parent, token_ids[i * bs : (i + 1) * bs], extra_keys)
            block_id = self.pool.lookup(block_hash)
            if block_id is None:
                break
            self.pool.incref([block_id])
            table.block_ids.append(block_id)
            table.block_hashes.append(block_hash)
            parent = block_hash
        table.num_tokens = len(table.block_ids) * bs
        return table.num_tokens
