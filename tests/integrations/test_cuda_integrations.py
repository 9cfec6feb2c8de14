"""On the GPU: bitsandbytes 4/8-bit checkpoints and an accelerate CPU-offload + GPU placement, paged."""

import pytest
import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig

import hf_paged
from tests.tiny import COMMON, ragged_batch

pytestmark = pytest.mark.cuda
GEN = dict(max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    config = LlamaConfig(**{**COMMON, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 4},
                         num_key_value_heads=2, head_dim=64)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return path


def _same_tokens(model):
    ids, mask = ragged_batch([9, 20], seed=40)
    ids, mask = ids.to(model.device), mask.to(model.device)
    ref = model.generate(ids, attention_mask=mask, **GEN)
    out = model.generate(ids, attention_mask=mask, cache_implementation="paged", **GEN)
    assert torch.equal(out, ref)
    llm = hf_paged.LLM(model, num_blocks=128, block_size=16)
    outputs = llm.generate([ids[0, 11:].tolist(), ids[1].tolist()],
                           hf_paged.SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == ref[:, ids.shape[1]:].tolist()
    return llm


@pytest.mark.parametrize("quant", [
    BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float16),
    BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype=torch.float16),
    BitsAndBytesConfig(load_in_8bit=True),
], ids=["nf4", "fp4", "int8"])
def test_bitsandbytes_on_cuda(checkpoint, quant):
    pytest.importorskip("bitsandbytes")
    model = AutoModelForCausalLM.from_pretrained(checkpoint, quantization_config=quant, device_map="cuda:0",
                                                 dtype=torch.float16).eval()
    _same_tokens(model)


def test_cpu_offload_plus_gpu_keeps_each_pool_on_its_layers_execution_device(checkpoint):
    device_map = {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": "cpu", "model.layers.2": 0,
                  "model.layers.3": "cpu", "model.norm": 0, "model.rotary_emb": 0, "lm_head": 0}
    model = AutoModelForCausalLM.from_pretrained(checkpoint, device_map=device_map, dtype=torch.float32).eval()
    ids, mask = ragged_batch([9, 20], seed=41)
    ids, mask = ids.cuda(), mask.cuda()
    ref = model.generate(ids, attention_mask=mask, **GEN)
    out = model.generate(ids, attention_mask=mask, cache_implementation="paged", return_dict_in_generate=True, **GEN)
    assert torch.equal(out.sequences, ref)
    # accelerate's CPU offload streams the offloaded layers' weights to the GPU and runs them there: every
    # layer's K/V, and so its pool, is on the GPU, while the weights of layers 1 and 3 stay off it.
    assert [layer.keys.device.type for layer in out.cache.layers] == ["cuda"] * 4
    assert model.model.layers[1].self_attn.q_proj.weight.device.type == "meta"
