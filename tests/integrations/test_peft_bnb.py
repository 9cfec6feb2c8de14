"""PEFT LoRA and bitsandbytes 4/8-bit models: paged generate and the engine give the default cache's tokens."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig

import hf_paged
from tests.tiny import COMMON, ragged_batch, tiny_model

peft = pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")

GEN = dict(max_new_tokens=10, do_sample=False, pad_token_id=0, eos_token_id=None)
GREEDY = hf_paged.SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)


def _check(model, fused_groups=0):
    """Paged generate and the engine (with projections fused where they can be: `fused_groups` of them) give the
    default cache's tokens."""
    ids, mask = ragged_batch([5, 9], seed=30)
    ref = model.generate(input_ids=ids, attention_mask=mask, **GEN)
    out = model.generate(input_ids=ids, attention_mask=mask, cache_implementation="paged", **GEN)
    assert torch.equal(out, ref)
    for fuse in (False, True):
        llm = hf_paged.LLM(model, num_blocks=64, block_size=4, fuse_projections=fuse)
        assert len(llm.engine.runner.fused) == (fused_groups if fuse else 0)
        prompts = [ids[0, 4:].tolist(), ids[1].tolist()]
        outputs = llm.generate(prompts, GREEDY, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outputs] == ref[:, ids.shape[1]:].tolist()
        assert llm.get_stats().blocks_in_use == 0


def test_lora_model():
    base = copy.deepcopy(tiny_model("llama"))
    config = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = peft.get_peft_model(base, config).eval()
    _check(model, fused_groups=base.config.num_hidden_layers)  # gate/up; q/k/v hold LoRA layers


def test_prefix_tuning_is_rejected_clearly():
    base = copy.deepcopy(tiny_model("llama"))
    model = peft.get_peft_model(base, peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)).eval()
    ids, _ = ragged_batch([5], seed=31)
    with pytest.raises(ValueError, match="prompt learning"):
        model.generate(input_ids=ids, cache_implementation="paged", **GEN)
    with pytest.raises(ValueError, match="prompt learning"):
        hf_paged.LLM(model, num_blocks=16)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    config = LlamaConfig(**{**COMMON, "hidden_size": 128, "intermediate_size": 256}, num_key_value_heads=2)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return path


@pytest.mark.parametrize(
    "quant",
    [
        BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32),
        BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype=torch.float32),
        BitsAndBytesConfig(load_in_8bit=True),
    ],
    ids=["nf4", "fp4", "int8"],
)
def test_bitsandbytes_checkpoint(checkpoint, quant):
    model = AutoModelForCausalLM.from_pretrained(checkpoint, quantization_config=quant, device_map="cpu").eval()
    _check(model)


def test_several_adapters_chosen_per_request_in_one_batch():
    base = copy.deepcopy(tiny_model("llama"))
    torch.manual_seed(1)
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                      init_lora_weights=False), adapter_name="alpha")
    torch.manual_seed(2)
    model.add_adapter("beta", peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "o_proj"],
                                           init_lora_weights=False))
    model.eval()
    ids, _ = ragged_batch([7], seed=32)
    prompt = ids[0].tolist()
    expected = {}
    for name in ("alpha", "beta"):
        model.set_adapter(name)
        expected[name] = model.generate(input_ids=ids, **GEN)[0, len(prompt):].tolist()
    assert expected["alpha"] != expected["beta"]
    model.set_adapter("alpha")
    llm = hf_paged.LLM(model, num_blocks=64, block_size=4)
    outputs = llm.generate([prompt, prompt, prompt], GREEDY, adapter=["alpha", "beta", "alpha"], use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == [expected["alpha"], expected["beta"], expected["alpha"]]
    # The adapter is part of the prefix-cache key: "beta" never reuses "alpha"'s blocks, a second "beta" does.
    again = llm.generate([prompt], GREEDY, adapter="beta", use_tqdm=False)[0]
    assert again.num_cached_tokens == 4 and again.outputs[0].token_ids == expected["beta"]
    with pytest.raises(hf_paged.RequestError, match="unknown adapter 'c'"):
        llm.generate([prompt], GREEDY, adapter="c")
    assert llm.get_stats().blocks_in_use == 0
