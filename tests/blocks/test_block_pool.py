"""Block pool and block tables on tiny pools: exact block ids, ref counts and free-queue order."""

import pytest

from hf_paged.blocks import BlockManager, BlockPool, BlockPoolExhausted, hash_block_tokens


def _manager(num_blocks=8, block_size=4, prefix_caching=True):
    pool = BlockPool(num_blocks, enable_prefix_caching=prefix_caching)
    return pool, BlockManager(pool, block_size)


def test_allocate_pops_from_head_and_free_appends_to_tail():
    pool = BlockPool(4)
    assert pool.allocate(2) == [0, 1]
    assert pool.free_queue.block_ids() == [2, 3]
    pool.free([1, 0])
    assert pool.free_queue.block_ids() == [2, 3, 1, 0]
    assert pool.allocate(3) == [2, 3, 1]


def test_append_allocates_on_demand_and_maps_slots():
    pool, mgr = _manager()
    table = mgr.new_table()
    result = mgr.append(table, 6)
    assert table.block_ids == [0, 1]
    assert result.slots == [0, 1, 2, 3, 4, 5]
    assert mgr.append(table, 3).slots == [6, 7, 8]  # fills block 1, then block 2
    assert table.block_ids == [0, 1, 2] and table.num_tokens == 9
    assert pool.num_free_blocks == 5


def test_fork_shares_blocks_and_copy_on_write_of_partial_block():
    pool, mgr = _manager()
    parent = mgr.new_table()
    mgr.append(parent, 6)  # blocks 0 (full), 1 (2 of 4)
    child = mgr.fork(parent)
    assert [pool.ref_cnt(b) for b in (0, 1)] == [2, 2]
    result = mgr.append(child, 1)
    # The shared partial block 1 is copied to a fresh block 2 before the child writes into it.
    assert result.copies == [(1, 2)]
    assert child.block_ids == [0, 2] and result.slots == [2 * 4 + 2]
    assert [pool.ref_cnt(b) for b in (0, 1, 2)] == [2, 1, 1]
    # The parent now owns block 1 alone: no copy (a decode token's short way), the slot after its 6 tokens.
    result = mgr.append(parent, 1)
    assert result.copies == [] and result.slots == [1 * 4 + 2]
    assert parent.block_ids == [0, 1] and parent.num_tokens == 7


def test_full_shared_block_is_not_copied():
    pool, mgr = _manager()
    parent = mgr.new_table()
    mgr.append(parent, 4)
    child = mgr.fork(parent)
    result = mgr.append(child, 1)
    assert result.copies == [] and child.block_ids == [0, 1]
    assert pool.ref_cnt(0) == 2


def test_exhaustion_raises_and_changes_nothing():
    pool, mgr = _manager(num_blocks=2)
    table = mgr.new_table()
    mgr.append(table, 5)
    with pytest.raises(BlockPoolExhausted, match="needed 1 free blocks, 0 of 2"):
        mgr.append(table, 4)
    assert table.num_tokens == 5 and table.block_ids == [0, 1]
    assert pool.num_free_blocks == 0


def test_free_returns_blocks_tail_first():
    pool, mgr = _manager(num_blocks=4)
    table = mgr.new_table()
    mgr.append(table, 12)
    mgr.free(table)
    assert pool.free_queue.block_ids() == [3, 2, 1, 0]
    assert table.block_ids == [] and table.num_tokens == 0


def test_truncate_frees_trailing_blocks():
    pool, mgr = _manager()
    table = mgr.new_table()
    mgr.append(table, 10)
    mgr.truncate(table, 5)
    assert table.block_ids == [0, 1] and table.num_tokens == 5
    assert pool.free_queue.block_ids()[-1] == 2
    with pytest.raises(ValueError, match="cannot truncate"):
        mgr.truncate(table, 6)


def test_prefix_cache_hit_shares_full_blocks_only():
    pool, mgr = _manager()
    tokens = list(range(10))
    first = mgr.new_table()
    mgr.append(first, 10)
    mgr.cache_full_blocks(first, tokens)
    assert len(first.block_hashes) == 2  # blocks 0 and 1 are full; block 2 holds 2 tokens
    second = mgr.new_table()
    assert mgr.match_prefix(second, tokens) == 8
    assert second.block_ids == [0, 1]
    assert [pool.ref_cnt(b) for b in (0, 1, 2)] == [2, 2, 1]
    assert (pool.num_cache_queries, pool.num_cache_hits) == (2, 2)


def test_prefix_match_leaves_one_token_to_compute():
    pool, mgr = _manager()
    tokens = list(range(8))
    first = mgr.new_table()
    mgr.append(first, 8)
    mgr.cache_full_blocks(first, tokens)
    second = mgr.new_table()
    assert mgr.match_prefix(second, tokens) == 4  # not 8: the last prompt token must run for its logits


def test_extra_keys_separate_cache_entries():
    assert hash_block_tokens(None, [1, 2], ("lora-a",)) != hash_block_tokens(None, [1, 2], ("lora-b",))
    assert hash_block_tokens(b"x", [1, 2]) != hash_block_tokens(b"y", [1, 2])


def test_freed_cached_blocks_are_reused_until_evicted_in_lru_order():
    pool, mgr = _manager(num_blocks=4)
    tokens = list(range(9))
    table = mgr.new_table()
    mgr.append(table, 9)  # blocks 0, 1, 2
    mgr.cache_full_blocks(table, tokens)
    mgr.free(table)
    assert pool.free_queue.block_ids() == [3, 2, 1, 0]
    # A hit "touches" blocks 0 and 1 out of the free queue.
    again = mgr.new_table()
    assert mgr.match_prefix(again, tokens) == 8
    assert pool.free_queue.block_ids() == [3, 2]
    mgr.free(again)
    assert pool.free_queue.block_ids() == [3, 2, 1, 0]
    # Allocating 3 evicts 3, 2 and then 1: block 1's hash is gone, block 0 (the prefix head) survives.
    other = mgr.new_table()
    mgr.append(other, 12)
    assert other.block_ids == [3, 2, 1]
    probe = mgr.new_table()
    assert mgr.match_prefix(probe, tokens) == 4 and probe.block_ids == [0]


def test_truncated_cached_block_leaves_prefix_cache():
    pool, mgr = _manager()
    tokens = list(range(8))
    table = mgr.new_table()
    mgr.append(table, 8)
    mgr.cache_full_blocks(table, tokens)
    mgr.truncate(table, 6)  # block 1 becomes partial and will be overwritten
    probe = mgr.new_table()
    assert mgr.match_prefix(probe, tokens + [99]) == 4
