"""PEFT LoRA with paged KV: one adapter through generate, two adapters chosen per request in the engine.

    python examples/peft_lora.py

Uses a tiny random Llama (no download) with randomly initialised LoRA adapters, so the text is noise; the point
is that paged generate and the engine give the same tokens as the default cache.
"""

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig

import hf_paged


def main() -> None:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2)
    base = AutoModelForCausalLM.from_config(config)
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = get_peft_model(base, lora, adapter_name="alpha")
    model.add_adapter("beta", LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.eval()

    prompt = torch.tensor([[5, 17, 42, 8, 99, 23]])
    kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None)
    paged = model.generate(input_ids=prompt, cache_implementation="paged", **kwargs)
    default = model.generate(input_ids=prompt, **kwargs)
    print("paged == default cache:", torch.equal(paged, default), paged[0, 6:].tolist())

    llm = hf_paged.LLM(model, num_blocks=64, block_size=4)
    params = hf_paged.SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    outputs = llm.generate([prompt[0].tolist()] * 2, params, adapter=["alpha", "beta"], use_tqdm=False)
    for name, output in zip(("alpha", "beta"), outputs):
        print(f"adapter {name}: {output.outputs[0].token_ids}")


if __name__ == "__main__":
    main()
