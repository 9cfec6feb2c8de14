"""kernels/ops.py picks Triton or the reference by device and HF_PAGED_KERNELS."""

import pytest
import torch

from hf_paged.kernels import ops, reference
from tests.kernels.paged_inputs import DEVICE, attention_inputs


@pytest.fixture
def calls(monkeypatch):
    """Record which implementation each op reaches."""
    seen = []
    for name in ("paged_attention", "write_kv", "copy_blocks"):
        original = getattr(reference, name)

        def spy(*args, _name=name, _original=original, **kwargs):
            seen.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(reference, name, spy)
    return seen


def run_all_ops():
    inputs = attention_inputs([2, 1], [5, 9], 4, 2, 64, 8, torch.float32)
    out = ops.paged_attention(**inputs, scale=0.125, max_seqlen_q=2)
    new_kv = torch.randn(3, 2, 64, device=DEVICE)
    ops.write_kv(new_kv, new_kv, inputs["key_cache"], inputs["value_cache"], torch.tensor([0, -1, 9], device=DEVICE))
    ids = torch.tensor([0, 1], device=DEVICE)
    ops.copy_blocks(inputs["key_cache"], inputs["value_cache"], ids[:1], ids[1:])
    return out, inputs


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback")
def test_cpu_tensors_use_torch(calls, monkeypatch):
    monkeypatch.delenv("HF_PAGED_KERNELS", raising=False)
    out, inputs = run_all_ops()
    assert calls == ["write_kv", "copy_blocks"]  # the attention took kernels/batched.py
    monkeypatch.setenv("HF_PAGED_KERNELS", "reference")
    assert ops.paged_attention(**inputs, scale=0.125).shape == out.shape
    assert calls[-1] == "paged_attention"


def test_forced_reference(calls, monkeypatch):
    monkeypatch.setenv("HF_PAGED_KERNELS", "reference")
    run_all_ops()
    assert calls == ["paged_attention", "write_kv", "copy_blocks"]


def test_forced_triton_matches_reference(calls, monkeypatch):
    monkeypatch.setenv("HF_PAGED_KERNELS", "triton")
    out, inputs = run_all_ops()
    assert calls == []
    monkeypatch.setenv("HF_PAGED_KERNELS", "reference")
    torch.testing.assert_close(out, ops.paged_attention(**inputs, scale=0.125))


def test_unknown_mode_is_an_error(monkeypatch):
    monkeypatch.setenv("HF_PAGED_KERNELS", "cuda")
    with pytest.raises(ValueError, match="HF_PAGED_KERNELS"):
        run_all_ops()


def test_engine_prefill_hands_the_kernel_its_own_kv(monkeypatch):
    """Through the engine and paged generate, the Triton prefill (interpreted here) of prompts without context
    gets the step's own K/V apart and is marked fresh (no block-table reads); a later chunk or a prefix-cache hit
    reads everything through the block tables; the tokens are the reference kernels'."""
    import hf_paged
    import hf_paged.kernels.paged_attention as triton_attention
    from tests.tiny import ragged_batch, tiny_model

    model = tiny_model("llama")
    prompts = [list(range(3, 30)), list(range(3, 22)) + [40, 41], [7, 8, 9]]  # the second shares 16 tokens
    params = hf_paged.SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    ids, mask = ragged_batch([6, 6], seed=2)  # no padding: the packed queries are every row's tokens
    gen = dict(max_new_tokens=3, do_sample=False, pad_token_id=0, eos_token_id=None)
    outs, given = {}, []
    real = triton_attention.paged_attention

    def spy(*args, **kwargs):
        q_len = args[9] if len(args) > 9 else kwargs.get("max_seqlen_q")
        given.append((q_len > 1, kwargs.get("key", args[10] if len(args) > 10 else None) is not None,
                      kwargs["fresh"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(triton_attention, "paged_attention", spy)
    for mode in ("reference", "triton"):
        monkeypatch.setenv("HF_PAGED_KERNELS", mode)
        llm = hf_paged.LLM(model, num_blocks=64, block_size=8, max_num_batched_tokens=20)
        outs[mode] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        outs[mode].append(model.generate(input_ids=ids, attention_mask=mask, cache_implementation="paged",
                                         **gen).tolist())
        assert llm.get_stats().prefix_cache_hits > 0
    assert outs["triton"] == outs["reference"]
    prefill = [(has_kv, fresh) for is_prefill, has_kv, fresh in given if is_prefill]
    assert all(has_kv == fresh for has_kv, fresh in prefill)  # own K/V exactly for fresh prompts
    assert {fresh for _, fresh in prefill} == {True, False}  # first chunks, generate's prompts; a second chunk, a hit
    assert not any(has_kv for is_prefill, has_kv, _ in given if not is_prefill)  # decodes read the pool


def test_write_and_attend_matches_write_then_attend(monkeypatch):
    """ops.write_and_attend = write_kv + paged_attention, on the torch path and through the (interpreted) Triton
    kernels, which store the step's K/V themselves; under torch.compile it mutates the caches it is given."""
    q_lens, seq_lens = [3, 1, 4], [5, 9, 4]
    results = {}
    for mode in ("reference", "triton", "compiled"):
        monkeypatch.setenv("HF_PAGED_KERNELS", "reference" if mode == "reference" else "triton")
        inputs = attention_inputs(q_lens, seq_lens, 4, 2, 64, 8, torch.float32, seed=5)
        gen = torch.Generator().manual_seed(1)
        key, value = (torch.randn(8, 2, 64, generator=gen).to(DEVICE) for _ in range(2))  # (T, Hkv, D)
        tables = inputs["block_tables"].tolist()
        slots = torch.tensor([tables[s][p // 8] * 8 + p % 8 for s, (q, n) in enumerate(zip(q_lens, seq_lens))
                              for p in range(n - q, n)], device=DEVICE)  # the new tokens' slots (T,)
        call = torch.compile(ops.write_and_attend, fullgraph=True) if mode == "compiled" else ops.write_and_attend
        out = call(inputs["query"], key, value, inputs["key_cache"], inputs["value_cache"], slots,
                   inputs["block_tables"], inputs["seq_lens"], inputs["cu_seqlens_q"], 0.125, None, None, 4)
        results[mode] = (out, inputs["key_cache"], inputs["value_cache"])
    expected = attention_inputs(q_lens, seq_lens, 4, 2, 64, 8, torch.float32, seed=5)
    ops.write_kv(key, value, expected["key_cache"], expected["value_cache"], slots)
    for mode, (out, key_cache, value_cache) in results.items():
        torch.testing.assert_close(key_cache, expected["key_cache"], atol=0, rtol=0, msg=mode)
        torch.testing.assert_close(value_cache, expected["value_cache"], atol=0, rtol=0, msg=mode)
        torch.testing.assert_close(out, results["reference"][0], atol=1e-4, rtol=1e-4, msg=mode)


def test_compiled_engine_writes_and_attends_in_one_call(monkeypatch):
    """The engine's compiled layers store a decode step's K/V from inside the attention: every decode forward
    reaches the Triton kernels (interpreted here) with its slots, in one call; prefill and mixed forwards (never
    marked fresh when compiled) store with write_kv, then read all their keys through the block tables. The
    tokens are the reference kernels', with the projections fused (V a slice of the q/k/v matmul's output) and
    for a sequence decoding alone."""
    import hf_paged
    import hf_paged.kernels.kv_write as triton_kv_write
    import hf_paged.kernels.paged_attention as triton_attention
    from tests.tiny import tiny_model

    model = tiny_model("llama")
    prompts = [list(range(3, 30)), list(range(3, 22)) + [40, 41], [7, 8, 9]]  # the second shares 16 tokens
    params = hf_paged.SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    seen = []
    real_attention, real_write = triton_attention.paged_attention, triton_kv_write.write_kv

    def spy_attention(*args, **kwargs):
        q_len = args[9] if len(args) > 9 else kwargs.get("max_seqlen_q")
        slots = args[12] if len(args) > 12 else kwargs.get("slot_mapping")
        seen.append(("decode" if q_len == 1 else "prefill", slots is not None))
        return real_attention(*args, **kwargs)

    def spy_write(*args, **kwargs):
        seen.append(("write_kv", True))
        return real_write(*args, **kwargs)

    monkeypatch.setattr(triton_attention, "paged_attention", spy_attention)
    monkeypatch.setattr(triton_kv_write, "write_kv", spy_write)
    outs = {}
    for mode in ("reference", "triton"):
        monkeypatch.setenv("HF_PAGED_KERNELS", mode)
        llm = hf_paged.LLM(model, num_blocks=64, block_size=8, max_num_batched_tokens=20, compile_model=True,
                           fuse_projections=True)
        seen.clear()  # the warm-up's first forward runs eagerly (it allocates the pools)
        outs[mode] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        outs[mode] += [o.outputs[0].token_ids for o in llm.generate(prompts[2:], params, use_tqdm=False)]
        assert llm.get_stats().prefix_cache_hits > 0
    assert outs["triton"] == outs["reference"]
    assert set(seen) == {("decode", True), ("prefill", False), ("write_kv", True)}, seen
    assert seen.count(("write_kv", True)) == seen.count(("prefill", False))  # one store per prefill forward
