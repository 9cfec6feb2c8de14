"""The CUDA-graph decode path's bookkeeping on CPU: static buffers, padding to buckets, pending tokens.

CUDA graphs need a GPU, so here the "graph" is the same forward run eagerly over the same static buffers at each
replay. Everything else (bucket padding, block-table refresh, the device-side fill of tokens still in flight) is
the real code; tests/hf/test_cuda.py runs the real capture on the device.
"""

import random
import re

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
    llm = make_llm(arch, max_num_seqs=16, compile_model=True)  # its warm-up compiles
    runner = _graph_runner(llm)
    counts = torch._dynamo.utils.counters
    counts.clear()
    out = llm.generate(prompts, params, use_tqdm=False)
    assert [[c.token_ids for c in o.outputs] for o in out] == [[c.token_ids for c in o.outputs] for o in ref]
    # The graphs reuse the warm-up's decode compilation. Gemma2's tiny sliding window (6 tokens) may split the
    # buckets once more: HF's mask code compares the query length (the bucket) with it.
    assert counts["stats"]["unique_graphs"] <= (0 if arch == "llama" else 1), dict(counts["stats"])
    assert not counts["graph_break"], dict(counts["graph_break"])  # the paged ops did not break the graph
    assert runner.graphs.graphs


def test_compiled_code_writes_the_pools_in_place(make_llm):
    """The KV write mutates the pools in place, folded into the attention op in decode steps, apart before it in
    prefill steps: no clone of a pool, no copy back into it (a 7B pool is GBs)."""
    from torch._inductor.utils import run_and_get_code

    llm = make_llm(compile_model=True)
    runner = llm.engine.runner
    codes, compiled = {}, runner.compiled_call

    def keep_code(*args):  # NOTE: run_and_get_code recompiles to see the code: once per kind of step
        decode = runner.cache._engine_plan.metadata.max_seqlen_q == 1
        if decode in codes:
            return compiled(*args)
        out, code = run_and_get_code(compiled, *args)
        codes[decode] = "\n".join(code)
        return out

    runner.compiled_call = keep_code
    llm.generate([[5, 6, 7, 8, 9], [10, 11]], SamplingParams(temperature=0, max_tokens=3), use_tqdm=False)
    decode, prefill = codes[True], codes[False]
    assert "torch.ops.hf_paged.write_and_attend.default(" in decode
    assert "torch.ops.hf_paged.write_kv" not in decode and "torch.ops.hf_paged.paged_attention" not in decode
    assert "torch.ops.hf_paged.write_kv.default(" in prefill and "torch.ops.hf_paged.paged_attention" in prefill
    assert "write_and_attend" not in prefill
    for code in (decode, prefill):
        assert "clone" not in code and "auto_functionalized" not in code and ".copy_(" not in code


def test_compiled_prefill_and_mixed_steps_match_eager(make_llm):
    """compile_model without CUDA graphs (CPU): every step's forward is compiled, with the step-dependent sizes
    dynamic and padded to 2, so a compilation serves prefills, mixed steps and single sequences alike."""
    import torch._dynamo

    torch._dynamo.reset()
    rng = random.Random(2)
    prompts = [[rng.randrange(3, VOCAB) for _ in range(rng.randint(1, 40))] for _ in range(10)]
    params = [SamplingParams(temperature=0, max_tokens=rng.randint(1, 12), ignore_eos=True) for _ in prompts]
    params[4] = SamplingParams(temperature=1.0, n=2, max_tokens=7, seed=3, ignore_eos=True)  # copy-on-write
    ref = make_llm(max_num_seqs=4, max_num_batched_tokens=24).generate(prompts, params, use_tqdm=False)
    counts = torch._dynamo.utils.counters
    counts.clear()
    llm = make_llm(max_num_seqs=4, max_num_batched_tokens=24, compile_model=True)  # warms up: compiles
    compiled = counts["stats"]["unique_graphs"]
    assert llm.get_stats().computed_tokens == 0 and llm.get_stats().prefix_cache_queries == 0  # no trace left
    alone = llm.generate(prompts[:1], params[0], use_tqdm=False)  # one sequence: S, K, T of 1 are padded
    out = llm.generate(prompts, params, use_tqdm=False)
    assert alone[0].outputs[0].token_ids == ref[0].outputs[0].token_ids
    assert [[c.token_ids for c in o.outputs] for o in out] == [[c.token_ids for c in o.outputs] for o in ref]
    assert not counts["graph_break"], dict(counts["graph_break"])
    # Two compilations, both in the warm-up: decode-only steps (max_seqlen_q == 1 picks the decode kernel) and
    # every other step.
    assert compiled == 2 and counts["stats"]["unique_graphs"] == compiled, dict(counts["stats"])


def test_compile_by_default_only_for_plain_gpu_models(make_llm):
    from hf_paged.engine.llm import compile_by_default

    llm = make_llm()  # CPU: compile_model=None stays off
    assert llm.engine.config.compile_model is False and llm.engine.runner.compiled_call is None
    assert compile_by_default(llm.engine.model) is False
    with pytest.raises(ValueError, match="enforce_eager"):
        make_llm(enforce_eager=True, compile_model=True)
    eager = make_llm(enforce_eager=True)
    assert eager.engine.config.enable_cuda_graphs is False and eager.engine.config.compile_model is False


def test_failed_default_compilation_falls_back_to_eager(make_llm, monkeypatch):
    """compile_model=None on a GPU model: a compilation that fails in the warm-up warns, leaves no request or block
    behind, and the engine runs eagerly with the same tokens; an explicit compile_model=True raises instead."""
    from hf_paged.engine import llm as llm_module

    def broken(fn, *args, **kwargs):
        def call(*a, **k):
            raise RuntimeError("inductor: no compiler here")
        return call

    prompts = [[5, 6, 7, 8, 9], [10, 11, 12]]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    ref = make_llm().generate(prompts, params, use_tqdm=False)
    monkeypatch.setattr(llm_module, "compile_by_default", lambda model: True)  # as for a plain model on a GPU
    monkeypatch.setattr(torch, "compile", broken)
    with pytest.warns(RuntimeWarning, match="runs eagerly"):
        llm = make_llm()
    assert llm.engine.config.compile_model is False and llm.engine.runner.compiled_call is None
    assert llm.get_stats().blocks_in_use == 0 and not llm.engine.has_unfinished_requests()
    out = llm.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in out] == [o.outputs[0].token_ids for o in ref]
    with pytest.raises(Exception, match="no compiler here"):
        make_llm(compile_model=True)


def test_batch_defaults_follow_vllm(monkeypatch):
    """max_num_seqs / max_num_batched_tokens left unset: 1024 / 16384 (server 8192) on a GPU of >= 70 GiB that is
    not an A100, else 256 / 8192; CUDA graphs stop at 512 sequences."""
    import types

    from hf_paged.engine.llm import batch_defaults

    def model_on(device: str):
        weight = types.SimpleNamespace(device=torch.device(device))
        return types.SimpleNamespace(get_input_embeddings=lambda: types.SimpleNamespace(weight=weight))

    assert batch_defaults(model_on("cpu")) == (256, 8192)
    for name, gib, expected in (("NVIDIA H200", 141, (1024, 16384)), ("NVIDIA A100-SXM4-80GB", 80, (256, 8192)),
                                ("NVIDIA L4", 24, (256, 8192))):
        props = types.SimpleNamespace(name=name, total_memory=gib * 2**30)
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device, props=props: props)
        assert batch_defaults(model_on("cuda")) == expected, name
        assert batch_defaults(model_on("cuda"), server=True) == (expected[0], 8192), name
    assert cuda_graphs.MAX_GRAPH_BATCH == 512
    assert cuda_graphs.batch_buckets(cuda_graphs.MAX_GRAPH_BATCH)[-1] == 512


def test_decoder_layers_share_one_compiled_graph():
    """Regional compilation: six layers still compile twice in all (decode-only steps and the rest), not per layer,
    and the user's model is left as it was between the engine's forwards (no compiled layer, no pool bound)."""
    import torch._dynamo
    from transformers import AutoModelForCausalLM, LlamaConfig

    from hf_paged import LLM
    from hf_paged.engine.compiled import attention_modules, compiles_by_layer, decoder_layers
    from tests.tiny import COMMON

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**dict(COMMON, num_hidden_layers=6), num_key_value_heads=2))
    model.eval()
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16]]
    params = SamplingParams(temperature=0, max_tokens=9, ignore_eos=True)
    ref = LLM(model, num_blocks=64, block_size=4).generate(prompts, params, use_tqdm=False)
    counts = torch._dynamo.utils.counters
    counts.clear()
    llm = LLM(model, num_blocks=64, block_size=4, compile_model=True)
    assert compiles_by_layer(model, llm.engine.cache) and len(decoder_layers(model)) == 6
    out = llm.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in out] == [o.outputs[0].token_ids for o in ref]
    assert counts["stats"]["unique_graphs"] == 2 and not counts["graph_break"], dict(counts["stats"])
    assert all(layer._compiled_call_impl is None for layer in decoder_layers(model))
    assert not any(hasattr(m, "hf_paged_keys") for m in attention_modules(model).values())
    assert llm.get_stats().blocks_in_use == 0


def test_whole_model_compile_scope(make_llm, monkeypatch):
    """HF_PAGED_COMPILE_SCOPE=model: the whole forward as one graph, with fused projections as on a GPU: the eager
    engine's tokens through prefill, mixed and decode steps, two compilations and no graph break, no layer compiled
    apart; the attention modules still hold their pools, so a decode step stores and attends in one op, and one
    layer's last residual add fuses into the next one's norm (fewer fused kernels than layers x those of one
    layer's graph); a bad value raises."""
    import torch._dynamo
    from torch._inductor.utils import run_and_get_code

    from hf_paged.engine.compiled import compile_scope, decoder_layers

    rng = random.Random(4)
    prompts = [[rng.randrange(3, VOCAB) for _ in range(rng.randint(2, 30))] for _ in range(5)]
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    ref = make_llm(max_num_seqs=8, max_num_batched_tokens=32).generate(prompts, params, use_tqdm=False)
    decode_code = {}
    for scope in ("layers", "model"):
        monkeypatch.setenv("HF_PAGED_COMPILE_SCOPE", scope)
        torch._dynamo.reset()
        counts = torch._dynamo.utils.counters
        counts.clear()
        llm = make_llm(max_num_seqs=8, max_num_batched_tokens=32, compile_model=True, fuse_projections=True)
        assert compile_scope() == scope
        out = llm.generate(prompts, params, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in out] == [o.outputs[0].token_ids for o in ref]
        assert counts["stats"]["unique_graphs"] == 2 and not counts["graph_break"], dict(counts["stats"])
        runner = llm.engine.runner
        compiled = runner.compiled_call
        assert (compiled.compiled == []) == (scope == "model")

        def keep_code(*args, runner=runner, compiled=compiled, scope=scope):
            if runner.cache._engine_plan.metadata.max_seqlen_q == 1 and scope not in decode_code:
                out, code = run_and_get_code(compiled, *args)  # NOTE: recompiles to see the code
                decode_code[scope] = "\n".join(code)
                return out
            return compiled(*args)

        runner.compiled_call = keep_code
        llm.generate(prompts[:2], SamplingParams(temperature=0, max_tokens=3), use_tqdm=False)
    layers = len(decoder_layers(llm.engine.model))
    for code in decode_code.values():
        assert "torch.ops.hf_paged.write_and_attend.default(" in code and "write_kv" not in code
    kernels = {scope: len(re.findall(r"^\s+cpp_fused_\w+\(", code, re.M)) for scope, code in decode_code.items()}
    assert 0 < kernels["model"] < layers * kernels["layers"], kernels
    monkeypatch.setenv("HF_PAGED_COMPILE_SCOPE", "everything")
    with pytest.raises(ValueError, match="HF_PAGED_COMPILE_SCOPE"):
        compile_scope()


@pytest.mark.parametrize("arch, graphs", [("mistral", 2), ("qwen2", 2), ("qwen2_sliding", 4), ("qwen3", 2),
                                          ("phi3", 2), ("gpt2", 2)])
def test_compiled_layers_across_architectures(make_llm, arch, graphs):
    """Every covered architecture compiles by layer: same tokens as eager, all compilations in the warm-up (two, or
    four where sliding and full layers alternate), no graph break."""
    import torch._dynamo

    from hf_paged.engine.compiled import compiles_by_layer

    torch._dynamo.reset()
    rng = random.Random(3)
    prompts = [[rng.randrange(3, VOCAB) for _ in range(rng.randint(2, 30))] for _ in range(5)]
    params = [SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)] * 4
    params.append(SamplingParams(temperature=1.0, n=2, max_tokens=6, seed=3, ignore_eos=True))
    ref = make_llm(arch, max_num_seqs=8, max_num_batched_tokens=32).generate(prompts, params, use_tqdm=False)
    counts = torch._dynamo.utils.counters
    counts.clear()
    llm = make_llm(arch, max_num_seqs=8, max_num_batched_tokens=32, compile_model=True)
    assert compiles_by_layer(llm.engine.model, llm.engine.cache)
    out = llm.generate(prompts, params, use_tqdm=False)
    assert [[c.token_ids for c in o.outputs] for o in out] == [[c.token_ids for c in o.outputs] for o in ref]
    assert counts["stats"]["unique_graphs"] == graphs and not counts["graph_break"], dict(counts["stats"])


def test_compiled_engine_under_preemption_and_prefix_hits(make_llm):
    """A small pool under compile: preemption by recompute, prefix-cache hits, n > 1 forks and logprobs give the
    eager engine's tokens."""
    rng = random.Random(5)
    prompts = [[rng.randrange(3, VOCAB) for _ in range(rng.randint(1, 60))] for _ in range(30)]
    prompts += [prompts[0][:20] + [rng.randrange(3, VOCAB) for _ in range(10)] for _ in range(4)]  # shared prefix
    params = [SamplingParams(temperature=0, max_tokens=rng.randint(1, 40), ignore_eos=True) for _ in prompts]
    params[3] = SamplingParams(temperature=0.8, n=3, max_tokens=20, seed=1, ignore_eos=True)
    params[7] = SamplingParams(temperature=1.0, top_k=5, max_tokens=25, seed=2, ignore_eos=True, logprobs=2)
    settings = dict(num_blocks=60, max_num_seqs=12, max_num_batched_tokens=48)
    ref = make_llm(**settings).generate(prompts, params, use_tqdm=False)
    llm = make_llm(compile_model=True, **settings)
    out = llm.generate(prompts, params, use_tqdm=False)
    assert [[c.token_ids for c in o.outputs] for o in out] == [[c.token_ids for c in o.outputs] for o in ref]
    for got, want in zip(out[7].outputs[0].logprobs, ref[7].outputs[0].logprobs):  # fused fp32 math: close, not equal
        assert got.keys() == want.keys() and list(got.values()) == pytest.approx(list(want.values()), abs=1e-4)
    stats = llm.get_stats()
    assert stats.num_preemptions > 0 and stats.prefix_cache_hits > 0


def test_pdl_switch_reaches_the_compiled_layers(monkeypatch):
    """HF_PAGED_PDL=1 on a Hopper-class GPU also turns on inductor's programmatic dependent launch for the engine's
    compilations; the option is one this torch takes (a CPU compile with it runs and computes the same)."""
    from hf_paged.engine.compiled import compile_options
    from hf_paged.kernels import tuning

    monkeypatch.setattr(tuning, "hopper_or_newer", lambda device: True)
    monkeypatch.delenv("HF_PAGED_PDL", raising=False)
    assert compile_options(torch.device("cuda")) is None
    monkeypatch.setenv("HF_PAGED_PDL", "1")
    assert compile_options(torch.device("cpu")) is None
    options = compile_options(torch.device("cuda"))
    assert options == {"triton.enable_pdl": True}
    x = torch.randn(8, 4)
    fn = torch.compile(lambda t: torch.nn.functional.silu(t) * 2 + 1, options=options)
    torch.testing.assert_close(fn(x), torch.nn.functional.silu(x) * 2 + 1)


def test_a_forward_that_cannot_be_captured_runs_eagerly(make_llm, monkeypatch):
    """A model whose decode forward breaks a capture (bitsandbytes' int8 matmul reads `.any()` back on the host)
    keeps its requests: the engine warns, drops the graphs and decodes eagerly, with the tokens of graphs off."""
    def failing_capture(self, b):
        ids, pos, plan, keep = self._plan(b)
        self.forward(ids, pos, plan, keep)  # the capture's warm-up forwards really run: they must store nothing
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing")

    monkeypatch.setattr(DecodeGraphs, "_capture", failing_capture)
    rng = random.Random(1)
    prompts = [[rng.randrange(3, VOCAB) for _ in range(rng.randint(2, 30))] for _ in range(5)]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    ref = make_llm(max_num_seqs=8).generate(prompts, params, use_tqdm=False)
    llm = make_llm(max_num_seqs=8)
    runner = _graph_runner(llm)
    with pytest.warns(RuntimeWarning, match="could not be captured"):
        out = llm.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in out] == [o.outputs[0].token_ids for o in ref]
    assert runner.graphs is None
    assert llm.generate(prompts[:2], params, use_tqdm=False)[1].outputs[0].token_ids == ref[1].outputs[0].token_ids
