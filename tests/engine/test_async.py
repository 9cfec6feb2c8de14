"""The asyncio front: streaming outputs, concurrent requests, cancellation returning blocks."""

import asyncio
import gc

import pytest

from hf_paged import AsyncLLMEngine, SamplingParams
from tests.engine.test_engine import GREEDY, _hf_greedy, _prompts
from tests.tiny import tiny_model


def test_streams_and_matches_batch_generate(make_llm, monkeypatch):
    llm = make_llm()
    prompts = _prompts(5, seed=20)
    frozen = []  # the serving loop steps with the heap frozen (engine/collector.py)
    step = llm.engine.step
    monkeypatch.setattr(llm.engine, "step", lambda *a, **k: frozen.append(gc.get_freeze_count() > 0) or step(*a, **k))

    async def main():
        front = AsyncLLMEngine(llm.engine)

        async def one(prompt):
            steps = [out async for out in front.generate(prompt, GREEDY)]
            return steps

        return await asyncio.gather(*(one(p) for p in prompts))

    streams = asyncio.run(main())
    model = tiny_model("llama")
    for prompt, steps in zip(prompts, streams):
        assert steps[-1].finished and not any(s.finished for s in steps[:-1])
        # Token ids grow one per step.
        assert [len(s.outputs[0].token_ids) for s in steps] == list(range(1, 13))
        assert steps[-1].outputs[0].token_ids == _hf_greedy(model, prompt, 12)
    assert frozen and all(frozen)


def test_cancelled_stream_aborts_and_frees_blocks(make_llm):
    llm = make_llm()
    long = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)

    async def main():
        front = AsyncLLMEngine(llm.engine)
        stream = front.generate(_prompts(1, seed=21)[0], long)
        seen = 0
        async for _ in stream:
            seen += 1
            if seen == 3:
                break
        await stream.aclose()
        other = [o async for o in front.generate(_prompts(1, seed=22)[0], GREEDY)]
        return other

    other = asyncio.run(main())
    assert other[-1].finished
    assert llm.get_stats().blocks_in_use == 0


def test_bad_request_raises_to_the_caller(make_llm):
    llm = make_llm()

    async def main():
        front = AsyncLLMEngine(llm.engine)
        with pytest.raises(ValueError, match="empty"):
            async for _ in front.generate([], GREEDY):
                pass

    asyncio.run(main())
