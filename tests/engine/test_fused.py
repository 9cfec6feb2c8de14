"""Fused projections (engine/fused.py): one matmul per q/k/v and gate/up group, same tokens, the model unchanged."""

import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_paged import LLM, SamplingParams
from hf_paged.engine.fused import fuse_projections, fused_forwards
from tests.tiny import CONFIGS, VOCAB


def fresh_model(arch="llama", seed=0):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(CONFIGS[arch]()).eval()


def test_fusion_keeps_parameters_values_and_checkpoints(tmp_path):
    """The parameters stay the same objects with the same values, now consecutive rows of one tensor per group;
    save_pretrained writes the checkpoint it wrote before."""
    model = fresh_model()
    params = dict(model.named_parameters())
    before = {name: p.detach().clone() for name, p in params.items()}
    groups = fuse_projections(model)
    assert len(groups) == 2 * model.config.num_hidden_layers  # q/k/v and gate/up per layer
    assert dict(model.named_parameters()) == params
    for name, p in model.named_parameters():
        torch.testing.assert_close(p, before[name], atol=0, rtol=0)
    attn = model.model.layers[0].self_attn
    fused = groups[0].weight
    assert fused.shape == (attn.q_proj.out_features + 2 * attn.k_proj.out_features, attn.q_proj.in_features)
    assert [p.data_ptr() for p in (attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight)] == [
        fused.data_ptr(), fused[attn.q_proj.out_features].data_ptr(),
        fused[attn.q_proj.out_features + attn.k_proj.out_features].data_ptr()]
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    for name, p in reloaded.named_parameters():
        torch.testing.assert_close(p, before[name], atol=0, rtol=0)


@pytest.mark.parametrize("arch, num_groups", [("llama", 4), ("qwen2", 4), ("gemma2", 8), ("phi3", 0), ("gpt2", 0)])
def test_fused_engine_matches_unfused(arch, num_groups):
    """Same tokens (fp32) with and without fusion, biases included (qwen2); models that fuse already (phi3's
    qkv_proj, gpt2's c_attn) have nothing to fuse. Between forwards the model runs its own code."""
    model = fresh_model(arch)
    rng = random.Random(1)
    prompts = [[rng.randrange(3, VOCAB) for _ in range(rng.randint(1, 30))] for _ in range(6)]
    params = [SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)] * 5
    params.append(SamplingParams(temperature=1.0, n=2, max_tokens=8, seed=4, ignore_eos=True))
    outs = {}
    for fuse in (False, True):
        llm = LLM(model, num_blocks=128, block_size=4, max_num_batched_tokens=40, fuse_projections=fuse)
        assert len(llm.engine.runner.fused) == (num_groups if fuse else 0)
        outs[fuse] = [[c.token_ids for c in o.outputs] for o in llm.generate(prompts, params, use_tqdm=False)]
        assert llm.get_stats().blocks_in_use == 0
    assert outs[True] == outs[False]
    assert not any("forward" in m.__dict__ for m in model.modules())


def test_fused_forward_serves_siblings_and_other_inputs():
    """A sibling called with the input its group saw gets its slice; with another input it computes its own."""
    model = fresh_model()
    attn = model.model.layers[0].self_attn
    x, y = torch.randn(1, 5, 64), torch.randn(1, 5, 64)
    order = (("q_proj", x), ("k_proj", x), ("v_proj", y), ("q_proj", y), ("k_proj", x))
    want = [getattr(attn, name)(inp) for name, inp in order]
    groups = fuse_projections(model)
    calls = []
    real = torch.nn.functional.linear
    with fused_forwards(groups), torch.no_grad():
        torch.nn.functional.linear = lambda *a: calls.append(a[1].shape[0]) or real(*a)
        try:
            got = [getattr(attn, name)(inp) for name, inp in order]
        finally:
            torch.nn.functional.linear = real
    # q's matmul serves k; v (another input) runs it again, which serves q; k then needs x again
    assert calls == [128, 128, 128]
    torch.testing.assert_close(got, want)


def test_replaced_weights_are_left_unfused():
    """A group whose parameter was replaced since fusion (a load with assign=True, say) runs unfused."""
    model = fresh_model()
    groups = fuse_projections(model)
    attn = model.model.layers[0].self_attn
    attn.k_proj.weight = torch.nn.Parameter(attn.k_proj.weight.detach().clone() * 2)
    x = torch.randn(1, 3, 64)
    with fused_forwards(groups), torch.no_grad():
        assert "forward" not in attn.k_proj.__dict__ and "forward" in model.model.layers[1].self_attn.k_proj.__dict__
        torch.testing.assert_close(attn.k_proj(x), torch.nn.functional.linear(x, attn.k_proj.weight))


def test_fused_compiled_layers_still_share_one_graph():
    """Under regional compilation the fused forwards keep one graph for all layers (two compilations in all, no
    graph break) and the eager tokens."""
    import torch._dynamo

    model = fresh_model("qwen2")
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16]]
    params = SamplingParams(temperature=0, max_tokens=9, ignore_eos=True)
    ref = LLM(model, num_blocks=64, block_size=4, fuse_projections=False).generate(prompts, params, use_tqdm=False)
    torch._dynamo.reset()
    counts = torch._dynamo.utils.counters
    counts.clear()
    llm = LLM(model, num_blocks=64, block_size=4, compile_model=True, fuse_projections=True)
    out = llm.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in out] == [o.outputs[0].token_ids for o in ref]
    assert counts["stats"]["unique_graphs"] == 2 and not counts["graph_break"], dict(counts["stats"])


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_skinny_engine_matches_cublas_path(arch, monkeypatch):
    """HF_PAGED_SKINNY_MATMUL=on with the Triton kernels (CPU interpreter): every plain projection, fused or not
    (o/down, the LM head; qwen2's biases), runs the skinny kernel in steps of <= 16 rows, with the same tokens as
    F.linear (fp32) and the model's own code again afterwards; =32 takes it up to 32 rows (the prefill chunks of
    up to 40 tokens stay on F.linear), here with the stream-K grid (HF_PAGED_SKINNY_GRID=stream)."""
    import hf_paged.kernels.skinny_matmul as skinny

    model = fresh_model(arch)
    rng = random.Random(2)
    prompts = [[rng.randrange(3, VOCAB) for _ in range(rng.randint(1, 30))] for _ in range(5)]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    calls = []
    run = skinny.skinny_linear
    monkeypatch.setattr(skinny, "skinny_linear", lambda *a, **k: calls.append(a[0].shape) or run(*a, **k))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    outs = {}
    for mode in ("off", "on"):
        monkeypatch.setenv("HF_PAGED_SKINNY_MATMUL", mode)
        monkeypatch.setenv("HF_PAGED_KERNELS", "triton" if mode == "on" else "auto")
        llm = LLM(model, num_blocks=128, block_size=4, max_num_batched_tokens=40, fuse_projections=True)
        outs[mode] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        if mode == "off":  # the Triton kernels, but the switch off: the projections stay on F.linear
            monkeypatch.setenv("HF_PAGED_KERNELS", "triton")
            LLM(model, num_blocks=128, block_size=4, fuse_projections=True).generate(prompts[:2], params,
                                                                                      use_tqdm=False)
            assert calls == []
    layers = model.config.num_hidden_layers
    assert len(calls) >= 5 * layers + 1  # a decode step: q/k/v, o, gate/up, down a layer and the LM head
    assert all(shape.numel() // shape[-1] <= 16 for shape in calls)
    assert outs["on"] == outs["off"]
    assert not any("forward" in m.__dict__ for m in model.modules())
    calls.clear()
    monkeypatch.setenv("HF_PAGED_SKINNY_MATMUL", "32")
    monkeypatch.setenv("HF_PAGED_SKINNY_GRID", "stream")
    llm = LLM(model, num_blocks=128, block_size=4, max_num_batched_tokens=40, fuse_projections=True)
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)] == outs["off"]
    rows = [shape.numel() // shape[-1] for shape in calls]
    assert max(rows) <= 32 and any(r > 16 for r in rows)  # prompts of 17-30 tokens: their prefill chunks
