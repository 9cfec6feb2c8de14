"""kernels/prefetch.py: which launches prefetch a weight into L2 (HF_PAGED_PREFETCH=1, Hopper and newer)."""

import pytest
import torch

from hf_paged.kernels import prefetch
from hf_paged.kernels.prefetch import PREFETCH_MAX_SEQS, prefetch_target


@pytest.fixture
def hopper(monkeypatch):
    """A CPU tensor stands in for a GPU one: the device check says yes, as an H100's would, with its 50 MB L2."""
    monkeypatch.setenv("HF_PAGED_PREFETCH", "1")
    monkeypatch.setattr(prefetch, "prefetch_enabled", lambda device: True)
    monkeypatch.setattr(prefetch, "l2_bytes", lambda device: 50 * 2**20)


def test_off_without_the_switch(monkeypatch):
    monkeypatch.delenv("HF_PAGED_PREFETCH", raising=False)
    weight = torch.zeros(64, 64)
    assert not prefetch.prefetch_enabled(weight.device)
    assert prefetch_target(weight, 1) is None


def test_off_on_the_cpu(monkeypatch):
    monkeypatch.setenv("HF_PAGED_PREFETCH", "1")
    assert not prefetch.prefetch_enabled(torch.device("cpu"))


def test_few_sequences_only(hopper):
    weight = torch.zeros(64, 64, dtype=torch.bfloat16)
    assert prefetch_target(weight, 1) is weight
    assert prefetch_target(weight, PREFETCH_MAX_SEQS) is weight
    assert prefetch_target(weight, PREFETCH_MAX_SEQS + 1) is None  # its K/V would evict the lines
    assert prefetch_target(None, 1) is None


def test_only_what_one_bulk_prefetch_can_name(hopper):
    base = torch.zeros(64, 65, dtype=torch.bfloat16)
    assert prefetch_target(base[:, :64], 1) is None  # not contiguous
    assert prefetch_target(torch.zeros(7, dtype=torch.bfloat16), 1) is None  # 14 bytes: not a multiple of 16
    assert prefetch_target(torch.zeros(72, dtype=torch.bfloat16)[1:65], 1) is None  # not 16-byte aligned


def test_only_what_fits_l2(hopper):
    o_proj_7b = torch.empty(4096, 4096, dtype=torch.bfloat16)  # 32 MiB of a 50 MiB L2
    assert prefetch_target(o_proj_7b, 1) is o_proj_7b
    o_proj_70b = torch.empty(8192, 8192, dtype=torch.bfloat16)  # 128 MiB: would only thrash it
    assert prefetch_target(o_proj_70b, 1) is None


def test_the_engine_offers_o_proj():
    from transformers import LlamaConfig, LlamaForCausalLM

    from hf_paged.attention import _output_weight

    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2))
    attention = model.model.layers[0].self_attn
    assert _output_weight(attention) is attention.o_proj.weight
    assert _output_weight(torch.nn.Module()) is None
