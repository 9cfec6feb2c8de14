"""The continuous-batching engine: hf_paged.LLM over the embedded SmolLM2-135M-Instruct.

    python examples/engine.py

Shows batch generation with a shared system prompt (prefix cache), parallel sampling (n=3 shares the prompt's
blocks), beam search, and the streaming interface with an abort.
"""

import hf_paged
from hf_paged.models import load_model

SYSTEM = {"role": "system", "content": "You are a concise assistant. Answer in one sentence."}
QUESTIONS = ["What is the capital of France?", "What is the largest planet?", "Who wrote Hamlet?"]


def main() -> None:
    model, tokenizer = load_model()
    llm = hf_paged.LLM(model, tokenizer, kv_cache_memory=64 * 2**20, max_num_seqs=16)

    greedy = hf_paged.SamplingParams(temperature=0, max_tokens=32)
    # The first conversation fills the prefix cache with the system prompt's blocks; the next two reuse them.
    outputs = llm.chat([[SYSTEM, {"role": "user", "content": QUESTIONS[0]}]], greedy, use_tqdm=False)
    outputs += llm.chat([[SYSTEM, {"role": "user", "content": q}] for q in QUESTIONS[1:]], greedy, use_tqdm=False)
    for question, output in zip(QUESTIONS, outputs):
        print(f"> {question}\n{output.outputs[0].text}  (prompt tokens from the prefix cache: "
              f"{output.num_cached_tokens})\n")

    samples = llm.generate("Once upon a time", hf_paged.SamplingParams(n=3, temperature=0.8, seed=0,
                                                                      max_tokens=16), use_tqdm=False)[0]
    for sample in samples.outputs:
        print(f"sample {sample.index}: {sample.text!r}")

    beams = llm.beam_search("The meaning of life is", hf_paged.BeamSearchParams(beam_width=3, max_tokens=12))[0]
    for beam in beams.outputs:
        print(f"beam (score {beam.cumulative_logprob:.2f}): {beam.text!r}")

    # Streaming: add requests, step the engine, abort one midway; its blocks go back to the pool.
    engine = llm.engine
    story = tokenizer.apply_chat_template([{"role": "user", "content": "Tell me a long story."}],
                                          add_generation_prompt=True, tokenize=False)
    engine.add_request("story", story, hf_paged.SamplingParams(temperature=0, max_tokens=64))
    engine.add_request("short", "Say hi.", hf_paged.SamplingParams(temperature=0, max_tokens=8))
    for step in range(6):
        for out in engine.step():
            print(f"step {step} {out.request_id}: {out.outputs[0].text!r}")
    engine.abort("story")
    while engine.has_unfinished_requests():
        engine.step()
    stats = llm.get_stats()
    print(f"\nblocks in use after the abort: {stats.blocks_in_use}; prefix-cache hit rate "
          f"{stats.prefix_cache_hit_rate:.0%}; preemptions {stats.num_preemptions}")


if __name__ == "__main__":
    main()
