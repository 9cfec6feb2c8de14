"""frozen_heap: the step loops run with the pre-existing heap frozen, and leave the collector as they found it."""

import gc

import pytest

from hf_paged import SamplingParams
from hf_paged.engine.collector import frozen_heap


@pytest.fixture(autouse=True)
def unfrozen():
    gc.unfreeze()
    yield
    gc.unfreeze()


def test_freezes_the_heap_and_gives_it_back():
    keep = [object() for _ in range(10)], {"a": []}  # tracked objects that exist before the block
    assert gc.get_freeze_count() == 0
    with frozen_heap():
        frozen = gc.get_freeze_count()
        assert frozen > 0
        with frozen_heap():  # nested: the outer block owns the freeze
            assert gc.get_freeze_count() == frozen
        assert gc.get_freeze_count() == frozen
    assert gc.get_freeze_count() == 0 and keep


def test_unfreezes_after_an_error():
    with pytest.raises(RuntimeError), frozen_heap():
        raise RuntimeError("a failing step")
    assert gc.get_freeze_count() == 0


def test_leaves_a_freeze_it_did_not_make():
    gc.freeze()  # say, a pre-fork server's
    before = gc.get_freeze_count()
    with frozen_heap():
        pass
    assert gc.get_freeze_count() == before > 0


def test_generate_steps_with_the_heap_frozen(make_llm, monkeypatch):
    llm = make_llm()
    counts = []
    step = llm.engine.step
    monkeypatch.setattr(llm.engine, "step", lambda *a, **k: counts.append(gc.get_freeze_count()) or step(*a, **k))
    out = llm.generate([[5, 6, 7], [8, 9]], SamplingParams(temperature=0, max_tokens=3), use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in out] == [3, 3]
    assert counts and all(c > 0 for c in counts)
    assert gc.get_freeze_count() == 0
