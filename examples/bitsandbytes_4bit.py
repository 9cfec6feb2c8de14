"""A bitsandbytes 4-bit (nf4) checkpoint with paged KV, on CPU or GPU.

    python examples/bitsandbytes_4bit.py

Saves a tiny random Llama, loads it back quantized with BitsAndBytesConfig (no download), and compares paged
generate and the engine with the default cache.
"""

import tempfile

import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig

import hf_paged


def main() -> None:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2)
    with tempfile.TemporaryDirectory() as path:
        AutoModelForCausalLM.from_config(config).save_pretrained(path)
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        model = AutoModelForCausalLM.from_pretrained(path, quantization_config=quant, device_map=device).eval()

    prompt = torch.tensor([[5, 17, 42, 8, 99, 23]], device=model.device)
    kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None)
    paged = model.generate(prompt, cache_implementation="paged", **kwargs)
    print("paged == default cache:", torch.equal(paged, model.generate(prompt, **kwargs)))
    llm = hf_paged.LLM(model, num_blocks=64, block_size=4)
    out = llm.generate([prompt[0].tolist()], hf_paged.SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
                       use_tqdm=False)[0]
    print("engine == generate:", out.outputs[0].token_ids == paged[0, 6:].tolist())


if __name__ == "__main__":
    main()
