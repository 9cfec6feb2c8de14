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
