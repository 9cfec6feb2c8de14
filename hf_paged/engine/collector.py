"""Keep Python's cyclic garbage collector from pausing the step loop.

A process holding a model has hundreds of thousands of objects the collector tracks (torch, transformers, the
compiled graphs), and a full collection walks all of them: 0.2 s on the 2-core development box with a tiny model
(docs/how-it-works.md), during which the GPU waits for its next step. `frozen_heap()` moves every object that
exists when a loop starts to the collector's permanent generation (`gc.freeze`), so collections during the loop
walk only what the loop itself created; leaving the loop gives them back (`gc.unfreeze`), so nothing stays exempt
from collection after it. vLLM and SGLang freeze the heap the same way around start-up and graph capture.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_lock = threading.Lock()
_depth = 0  # nested frozen_heap() blocks (an LLM.generate inside a serving loop, say)
_ours = False  # whether the outermost block froze the heap (it leaves a freeze made by someone else alone)


@contextmanager
def frozen_heap() -> Iterator[None]:
    global _depth, _ours
    with _lock:
        if _depth == 0:
            _ours = gc.get_freeze_count() == 0
            if _ours:
                gc.freeze()
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _ours:
                gc.unfreeze()
                _ours = False
