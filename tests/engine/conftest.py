import pytest

from hf_paged import LLM
from tests.tiny import tiny_model


@pytest.fixture
def make_llm():
    """Build LLMs on tiny models; after the test, every one of them must hold 0 KV blocks."""
    made = []

    def make(arch="llama", **kwargs):
        kwargs.setdefault("num_blocks", 256)
        kwargs.setdefault("block_size", 4)
        llm = LLM(tiny_model(arch), **kwargs)
        made.append(llm)
        return llm

    yield make
    for llm in made:
        assert llm.get_stats().blocks_in_use == 0
        assert not llm.engine.has_unfinished_requests()
