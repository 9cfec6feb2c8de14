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


@pytest.fixture
def calls(monkeypatch):
    """The collector's freeze/unfreeze calls, in order (counts alone drift: a frozen object that dies leaves the
    permanent generation, so another thread's garbage can lower the count inside a block)."""
    seen = []
    freeze, unfreeze = gc.freeze, gc.unfreeze
    monkeypatch.setattr(gc, "freeze", lambda: seen.append("freeze") or freeze())
    monkeypatch.setattr(gc, "unfreeze", lambda: seen.append("unfreeze") or unfreeze())
    return seen


def test_freezes_the_heap_and_gives_it_back(calls):
    keep = [object() for _ in range(10)], {"a": []}  # tracked objects that exist before the block
    assert gc.get_freeze_count() == 0
    with frozen_heap():
        assert gc.get_freeze_count() > 0 and calls == ["freeze"]
        with frozen_heap():  # nested: the outer block owns the freeze
            assert gc.get_freeze_count() > 0
        assert gc.get_freeze_count() > 0 and calls == ["freeze"]
    assert gc.get_freeze_count() == 0 and keep
    assert calls == ["freeze", "unfreeze"]


def test_unfreezes_after_an_error():
    with pytest.raises(RuntimeError), frozen_heap():
        raise RuntimeError("a failing step")
    assert gc.get_freeze_count() == 0


def test_leaves_a_freeze_it_did_not_make(calls):
    gc.freeze()  # say, a pre-fork server's
    with frozen_heap():
        pass
    assert gc.get_freeze_count() > 0
    assert calls == ["freeze"]  # the test's own: the block neither froze again nor unfroze


def test_generate_steps_with_the_heap_frozen(make_llm, monkeypatch):
    llm = make_llm()
    counts = []
    step = llm.engine.step
    monkeypatch.setattr(llm.engine, "step", lambda *a, **k: counts.append(gc.get_freeze_count()) or step(*a, **k))
    out = llm.generate([[5, 6, 7], [8, 9]], SamplingParams(temperature=0, max_tokens=3), use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in out] == [3, 3]
    assert counts and all(c > 0 for c in counts)
    assert gc.get_freeze_count() == 0
