"""Talk to a running hf_paged server with the official openai client (this script starts nothing).

    python -m hf_paged.server &                       # in another shell: the embedded SmolLM2-135M-Instruct
    python examples/openai_client.py                  # or: --base-url http://127.0.0.1:8001/v1 --api-key sekret
"""

import argparse

from openai import OpenAI


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--api-key", default="none", help="the server's --api-key (any value when it has none)")
    args = parser.parse_args()
    client = OpenAI(base_url=args.base_url, api_key=args.api_key, max_retries=0, timeout=120.0)

    model = client.models.list().data[0].id
    print(f"model: {model}\n")

    reply = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=32, temperature=0,
    )
    print("chat:", reply.choices[0].message.content)
    print("usage:", reply.usage.model_dump(exclude_none=True), "\n")

    print("streamed chat: ", end="")
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Write a haiku about memory pages."}],
        max_tokens=48, temperature=0.7, seed=0, stream=True,
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            print(chunk.choices[0].delta.content, end="", flush=True)
    print("\n")

    # Two samples of one prompt share its KV blocks; vLLM's extra sampling fields go in extra_body.
    out = client.completions.create(model=model, prompt="Once upon a time", max_tokens=24, n=2, seed=1,
                                    temperature=0.9, extra_body={"top_k": 40, "repetition_penalty": 1.1})
    for choice in out.choices:
        print(f"completion {choice.index}: {choice.text!r} ({choice.finish_reason})")

    out = client.completions.create(model=model, prompt="The capital of France is", max_tokens=4, temperature=0,
                                    logprobs=2)
    logprobs = out.choices[0].logprobs
    for token, logprob, top in zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs):
        print(f"{token!r:>12} {logprob:8.3f}  top: {top}")


if __name__ == "__main__":
    main()
