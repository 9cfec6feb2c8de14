"""A text-generation pipeline with one added argument, cache_implementation="paged".

    python examples/pipeline.py

With a list of inputs the whole list runs through hf_paged's continuous-batching engine instead of padded
static batches; the results are the pipeline's usual records.
"""

from transformers import pipeline

import hf_paged  # noqa: F401  (registers the paged routing)
from hf_paged.models import load_model

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Name three primary colors."}],
    [{"role": "user", "content": "What is 2 + 2?"}],
]


def main() -> None:
    model, tokenizer = load_model()
    pipe = pipeline("text-generation", model=model, tokenizer=tokenizer)
    results = pipe(CHATS, max_new_tokens=32, do_sample=False, cache_implementation="paged")
    for records in results:
        conversation = records[0]["generated_text"]
        print(f"> {conversation[0]['content']}\n{conversation[-1]['content']}\n")


if __name__ == "__main__":
    main()
