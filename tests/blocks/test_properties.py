"""Property tests: random allocate / append / fork / truncate / free never leak or double-free a block."""

from collections import Counter

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from hf_paged.blocks import BlockManager, BlockPool, BlockPoolExhausted

NUM_BLOCKS, BLOCK_SIZE = 12, 4


class BlockTables(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.pool = BlockPool(NUM_BLOCKS)
        self.mgr = BlockManager(self.pool, BLOCK_SIZE)
        self.tables = []
        self.tokens = []  # the token ids each table holds, for prefix caching

    @rule(n=st.integers(1, 10))
    def new_sequence(self, n):
        table = self.mgr.new_table()
        tokens = list(range(100, 100 + n))
        computed = self.mgr.match_prefix(table, tokens)
        try:
            self.mgr.append(table, n - computed)
        except BlockPoolExhausted:
            self.mgr.free(table)
            return
        self.mgr.cache_full_blocks(table, tokens)
        self.tables.append(table)
        self.tokens.append(tokens)

    @precondition(lambda self: self.tables)
    @rule(i=st.integers(0, 100), n=st.integers(0, 6))
    def append(self, i, n):
        i %= len(self.tables)
        table = self.tables[i]
        before = (list(table.block_ids), table.num_tokens)
        try:
            result = self.mgr.append(table, n)
        except BlockPoolExhausted:
            assert (table.block_ids, table.num_tokens) == before
            return
        assert len(result.slots) == n
        self.tokens[i] = self.tokens[i] + [i] * n

    @precondition(lambda self: self.tables)
    @rule(i=st.integers(0, 100))
    def fork(self, i):
        i %= len(self.tables)
        self.tables.append(self.mgr.fork(self.tables[i]))
        self.tokens.append(list(self.tokens[i]))

    @precondition(lambda self: self.tables)
    @rule(i=st.integers(0, 100), keep=st.integers(0, 100))
    def truncate(self, i, keep):
        i %= len(self.tables)
        keep %= self.tables[i].num_tokens + 1
        self.mgr.truncate(self.tables[i], keep)
        self.tokens[i] = self.tokens[i][:keep]

    @precondition(lambda self: self.tables)
    @rule(i=st.integers(0, 100))
    def free(self, i):
        i %= len(self.tables)
        self.mgr.free(self.tables.pop(i))
        self.tokens.pop(i)

    @invariant()
    def ref_counts_match_holders(self):
        held = Counter(b for t in self.tables for b in t.block_ids)
        for block in self.pool.blocks:
            assert block.ref_cnt == held.get(block.block_id, 0)

    @invariant()
    def free_queue_is_exactly_the_unreferenced_blocks(self):
        free = self.pool.free_queue.block_ids()
        assert len(free) == len(set(free)) == self.pool.num_free_blocks
        assert set(free) == {b.block_id for b in self.pool.blocks if b.ref_cnt == 0}

    @invariant()
    def tables_have_exactly_the_blocks_they_need(self):
        for table in self.tables:
            assert len(table.block_ids) == -(-table.num_tokens // BLOCK_SIZE)

    @invariant()
    def cached_hashes_point_at_their_blocks(self):
        for block_hash, block in self.pool.cached.items():
            assert block.block_hash == block_hash


BlockTables.TestCase.settings = settings(max_examples=150, stateful_step_count=30, deadline=None)
TestBlockTables = BlockTables.TestCase


def test_everything_returns_to_the_pool():
    pool = BlockPool(NUM_BLOCKS)
    mgr = BlockManager(pool, BLOCK_SIZE)
    a = mgr.new_table()
    mgr.append(a, 9)
    b = mgr.fork(a)
    mgr.append(b, 3)
    mgr.free(a)
    mgr.free(b)
    assert pool.num_free_blocks == NUM_BLOCKS
