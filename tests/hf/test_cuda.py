"""On the GPU: paged generate (Triton kernels) and the engine against DynamicCache + sdpa."""

import contextlib

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig

import hf_paged
from tests.tiny import ragged_batch

pytestmark = pytest.mark.cuda

SHAPE = dict(vocab_size=96, hidden_size=512, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=8,
             num_key_value_heads=2, head_dim=64, max_position_embeddings=2048, initializer_range=0.1,
             pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _model(config_cls, dtype, **extra):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config_cls(**SHAPE, **extra), dtype=dtype)
    return model.to("cuda").eval()


def _assert_greedy_matches_generate(llm, model, prompts, max_tokens):
    """The engine's greedy outputs equal HF generate's, prompt by prompt."""
    outputs = llm.generate(prompts, hf_paged.SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True),
                           use_tqdm=False)
    for prompt, output in zip(prompts, outputs):
        ref = model.generate(torch.tensor([prompt], device="cuda"), max_new_tokens=max_tokens, do_sample=False,
                             pad_token_id=0, eos_token_id=None)
        assert output.outputs[0].token_ids == ref[0, len(prompt):].tolist()


@pytest.mark.parametrize("config_cls,extra", [(LlamaConfig, {}), (MistralConfig, {"sliding_window": 24})],
                         ids=["llama", "mistral-sliding"])
def test_generate_paged_on_cuda_matches_dynamic_cache(config_cls, extra):
    model = _model(config_cls, torch.float32, **extra)
    ids, mask = ragged_batch([40, 7, 23, 60], seed=1)
    ids, mask = ids.cuda(), mask.cuda()
    kwargs = dict(attention_mask=mask, max_new_tokens=40, do_sample=False, pad_token_id=0, eos_token_id=None,
                  return_dict_in_generate=True, output_scores=True)
    ref = model.generate(ids, **kwargs)
    out = model.generate(ids, cache_implementation="paged", **kwargs)
    torch.testing.assert_close(torch.stack(out.scores), torch.stack(ref.scores), rtol=2e-3, atol=2e-3)
    assert torch.equal(out.sequences, ref.sequences)
    beams = dict(kwargs, num_beams=4, num_return_sequences=2, output_scores=False)
    assert torch.equal(model.generate(ids, cache_implementation="paged", **beams).sequences,
                       model.generate(ids, **beams).sequences)


@pytest.mark.parametrize("arch", ["gpt_oss", "deepseek_v3"])
def test_sinks_and_latents_on_cuda(arch):
    """Attention sinks through the Triton kernels (gpt-oss: sliding and full layers), latents expanded in torch
    (DeepSeek-V3): paged generate and the engine's defaults (sinks: compiled forwards and CUDA graphs; latents:
    eager, with a warning) against DynamicCache."""
    from tests.tiny import tiny_model

    model = tiny_model(arch).to("cuda")
    try:
        ids, mask = ragged_batch([40, 7, 23], seed=3)
        ids, mask = ids.cuda(), mask.cuda()
        kwargs = dict(attention_mask=mask, max_new_tokens=30, do_sample=False, pad_token_id=0, eos_token_id=None)
        ref = model.generate(ids, **kwargs)
        assert torch.equal(model.generate(ids, cache_implementation="paged", **kwargs), ref)
        prompts = [ragged_batch([n], seed=n)[0][0].tolist() for n in (5, 17, 33)]
        with pytest.warns(RuntimeWarning, match="latents") if arch == "deepseek_v3" else contextlib.nullcontext():
            llm = hf_paged.LLM(model, num_blocks=256, max_num_batched_tokens=64)
        _assert_greedy_matches_generate(llm, model, prompts, 16)
    finally:
        model.to("cpu")  # tiny_model caches it for the CPU tests


def test_generate_paged_bf16_logits_close():
    model = _model(LlamaConfig, torch.bfloat16)
    ids, mask = ragged_batch([33, 12], seed=2)
    ids, mask = ids.cuda(), mask.cuda()
    kwargs = dict(attention_mask=mask, max_new_tokens=1, do_sample=False, pad_token_id=0,
                  return_dict_in_generate=True, output_logits=True)
    ref = model.generate(ids, **kwargs).logits[0].float()
    out = model.generate(ids, cache_implementation="paged", **kwargs).logits[0].float()
    torch.testing.assert_close(out, ref, rtol=3e-2, atol=3e-2)


def test_engine_on_cuda_matches_generate():
    """The LLM's defaults on a GPU (compiled forwards, CUDA graphs, async scheduling) against HF generate."""
    model = _model(LlamaConfig, torch.float32)
    prompts = [ragged_batch([n], seed=n)[0][0].tolist() for n in (5, 17, 33, 64, 100, 3)]
    llm = hf_paged.LLM(model, num_blocks=512, max_num_batched_tokens=64)
    assert llm.engine.config.compile_model and llm.engine.runner.graphs is not None
    _assert_greedy_matches_generate(llm, model, prompts, 24)
    assert llm.get_stats().blocks_in_use == 0


def test_engine_cuda_graphs_match_eager_and_generate():
    model = _model(LlamaConfig, torch.float32)
    prompts = [ragged_batch([n], seed=n)[0][0].tolist() for n in (5, 17, 33, 64, 100, 3, 9, 41, 2, 77, 12)]
    greedy = hf_paged.SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    sampled = hf_paged.SamplingParams(n=2, temperature=1.0, max_tokens=20, ignore_eos=True, seed=3)
    outs = {}
    for graphs in (True, False):
        llm = hf_paged.LLM(model, num_blocks=512, block_size=16, max_num_seqs=16, enable_cuda_graphs=graphs,
                           compile_model=False)
        outs[graphs] = [[c.token_ids for c in o.outputs]
                        for o in llm.generate(prompts, greedy, use_tqdm=False) + llm.generate(prompts[:4], sampled,
                                                                                            use_tqdm=False)]
        assert llm.get_stats().blocks_in_use == 0
        if graphs:
            assert llm.engine.runner.graphs.graphs  # decode steps really replayed graphs
    assert outs[True] == outs[False]
    for prompt, tokens in zip(prompts, outs[True]):
        ref = model.generate(torch.tensor([prompt], device="cuda"), max_new_tokens=20, do_sample=False,
                             pad_token_id=0, eos_token_id=None)
        assert tokens[0] == ref[0, len(prompt):].tolist()


@pytest.mark.parametrize("async_scheduling", [True, False])
def test_engine_compiled_graphs_match_eager(async_scheduling):
    """compile_model=True: the captured decode forward is torch.compile'd (inductor); fp32 tokens unchanged."""
    model = _model(LlamaConfig, torch.float32)
    prompts = [ragged_batch([n], seed=n)[0][0].tolist() for n in (5, 17, 33, 64, 100, 3, 9, 41, 2, 77, 12)]
    greedy = hf_paged.SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    outs = {}
    for compiled in (True, False):
        llm = hf_paged.LLM(model, num_blocks=512, block_size=16, max_num_seqs=16, compile_model=compiled,
                           async_scheduling=async_scheduling)
        outs[compiled] = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy, use_tqdm=False)]
        assert llm.get_stats().blocks_in_use == 0
        assert llm.engine.runner.graphs.graphs  # the decode steps replayed (compiled) graphs
    assert outs[True] == outs[False]


def test_steps_bench_on_cuda(tmp_path):
    """`hf-paged bench steps` on the GPU: the default (compiled) setting first, kernel time found, syncs counted."""
    import json

    from hf_paged.bench import steps

    out = tmp_path / "steps.json"
    assert steps.main(["--model", "tiny", "--batch", "2,4", "--context", "16", "--steps", "3", "--compare",
                       "--sync-debug", "--out", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    assert [(r["setting"], r["batch"]) for r in results] == [
        (setting, batch) for batch in (2, 4) for setting in (
            "cuda graphs + async scheduling + compile", "cuda graphs + async scheduling", "eager")]
    for r in results:
        assert r["kernel_ms"] > 0 and r["matmul_gbps"] > 0 and isinstance(r["syncs"], dict)
