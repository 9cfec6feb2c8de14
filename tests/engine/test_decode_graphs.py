"""The CUDA-graph decode path's bookkeeping on CPU: static buffers, padding to buckets, pending tokens.

CUDA graphs need a GPU, so here the "graph" is the same forward run eagerly over the same static buffers at each
replay. Everything else (bucket padding, block-table refresh, the device-side fill of tokens still in flight) is
the real code; tests/hf/test_cuda.py runs the real capture on the device.
"""

import random

import pytest
import torch

from hf_paged import SamplingParams
from hf_paged.engine import cuda_graphs
from hf_paged.engine.cuda_graphs import DecodeGraphs, _Graph
from tests.tiny import VOCAB


class _EagerGraph:
    def __init__(self, replay):
        self.replay = replay


def _eager_capture(self, b):
    ids, pos, plan, keep = self._plan(b)
    logits = self.forward(ids, pos, plan, keep).clone()
    return _Graph(_EagerGraph(lambda: logits.copy_(self.forward(ids, pos, plan, keep))), logits)


def _graph_runner(llm):
    runner = llm.engine.runner
    runner.graphs = DecodeGraphs(runner.model, runner.cache, 16, 64, runner.decode_forward,
                                 smallest_bucket=2 if runner.compiled_call is not None else 1)  # as ModelRunner
    return runner


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_graph_path_matches_the_packed_forward(make_llm, monkeypatch, async_scheduling):
    monkeypatch.setattr(DecodeGraphs, "_capture", _eager_capture)
    rng = random.Random(0)
    prompts = [[rng.randrange(3, VOCAB) for _ in range(rng.randint(2, 40))] for _ in range(11)]
    params = [SamplingParams(temperature=0, max_tokens=rng.randint(3, 25), ignore_eos=True) for _ in prompts]
    params[3] = SamplingParams(temperature=0.9, max_tokens=18, seed=4, ignore_eos=True)
    params[5] = SamplingParams(temperature=1.0, n=2, max_tokens=15, seed=8, ignore_eos=True)  # copy-on-write
    ref = make_llm(max_num_seqs=16).generate(prompts, params, use_tqdm=False)
    llm = make_llm(max_num_seqs=16, async_scheduling=async_scheduling)
    runner = _graph_runner(llm)
    replays = []
    run = runner.graphs.run
    monkeypatch.setattr(runner.graphs, "run", lambda *a, **k: replays.append(len(a[0])) or run(*a, **k))
    out = llm.generate(prompts, params, use_tqdm=False)
    assert [[c.token_ids for c in o.outputs] for o in out] == [[c.token_ids for c in o.outputs] for o in ref]
    assert len(replays) > 10 and len(set(replays)) > 3  # many decode steps, several bucket sizes
    assert set(runner.graphs.graphs) <= set(cuda_graphs.batch_buckets(16))


@pytest.mark.parametrize("arch", ["llama", "gemma2"])  # gemma2: soft-capping, alternating sliding layers
def test_compiled_decode_forward_matches_eager(make_llm, monkeypatch, arch):
    """compile_model: the captured decode forward is torch.compile'd; the paged ops stay opaque custom ops."""
    import torch._dynamo

    monkeypatch.setattr(DecodeGraphs, "_capture", _eager_capture)
    torch._dynamo.reset()
    rng = random.Random(1)
    prompts = [[rng.randrange(3, VOCAB) for _ in range(rng.randint(2, 30))] for _ in range(9)]
    params = [SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)] * 8
    params.append(SamplingParams(temperature=1.0, n=3, max_tokens=6, seed=2, ignore_eos=True))  # copy-on-write
    ref = make_llm(arch, max_num_seqs=16).generate(prompts, params, use_tqdm=False)
    llm = make_llm(arch, max_num_seqs=16, compile_model=True)
    runner = _graph_runner(llm)
    counts = torch._dynamo.utils.counters
    counts.clear()
    codes, compiled = [], runner.compiled_call
    runner.compiled_call = lambda *a: _keep_code(codes, compiled, *a)
    out = llm.generate(prompts, params, use_tqdm=False)
    assert [[c.token_ids for c in o.outputs] for o in out] == [[c.token_ids for c in o.outputs] for o in ref]
    assert counts["stats"]["unique_graphs"] >= 1  # the decode forwards really went through dynamo
    # One compilation for every bucket. Gemma2's tiny sliding window (6 tokens) splits them once more: HF's mask
    # code compares the query length (here the bucket) with the window.
    assert counts["stats"]["unique_graphs"] == (1 if arch == "llama" else 2), dict(counts["stats"])
    assert not counts["graph_break"], dict(counts["graph_break"])  # one graph: the paged ops did not break it
    assert runner.graphs.graphs
    # The KV write mutates the pools in place: no clone of a pool, no copy back into it (a 7B pool is GBs).
    code = "\n".join(codes)
    assert "torch.ops.hf_paged.write_kv.default(" in code and "torch.ops.hf_paged.paged_attention.default(" in code
    assert "clone" not in code and "auto_functionalized" not in code and ".copy_(" not in code


def _keep_code(codes, compiled, *args):
    from torch._inductor.utils import run_and_get_code

    if codes:
        return compiled(*args)
    out, code = run_and_get_code(compiled, *args)
    codes.extend(code)
    return out
