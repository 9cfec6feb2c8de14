"""Run under torchrun: tensor-parallel serving. Rank 0 drives an AsyncLLMEngine (what the HTTP server uses) and
broadcasts each step; the other ranks follow. Rank 0 writes what every rank saw."""

import asyncio
import json
import sys

import torch.distributed as dist
from transformers import AutoModelForCausalLM

import hf_paged
from hf_paged.engine.tp import StepSync

GREEDY = hf_paged.SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
SEEDED = hf_paged.SamplingParams(temperature=1.0, max_tokens=10, ignore_eos=True, seed=7)
FREE = hf_paged.SamplingParams(temperature=1.0, max_tokens=10, ignore_eos=True)
LONG = hf_paged.SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)


async def lead(front: hf_paged.AsyncLLMEngine, prompts: list[list[int]]) -> dict:
    async def collect(prompt, params, request_id, stop_after=None, delay=0.0):
        await asyncio.sleep(delay)
        tokens = []
        async for out in front.generate(prompt, params, request_id):
            tokens = out.outputs[0].token_ids
            if stop_after is not None and len(tokens) >= stop_after:
                break  # leaving the stream aborts the request on every rank
        return tokens

    jobs = [collect(p, GREEDY, f"greedy-{i}") for i, p in enumerate(prompts)]
    jobs += [collect(prompts[0], SEEDED, "seeded"), collect(prompts[1], FREE, "free"),
             collect(prompts[2], LONG, "long", stop_after=3), collect(prompts[0], GREEDY, "late", delay=0.05)]
    results = await asyncio.gather(*jobs)
    front._task.cancel()
    return dict(zip([f"greedy-{i}" for i in range(len(prompts))] + ["seeded", "free", "long", "late"], results))


def main(model_dir: str, out_path: str) -> None:
    dist.init_process_group("gloo")
    model = AutoModelForCausalLM.from_pretrained(model_dir, tp_plan="auto").eval()
    prompts = json.loads(open(f"{model_dir}/prompts.json").read())
    engine = hf_paged.LLM(model, num_blocks=128, block_size=4).engine
    sync = StepSync(engine)
    result = {}
    if sync.rank == 0:
        result = asyncio.run(lead(hf_paged.AsyncLLMEngine(engine, sync=sync), prompts))
        sync.shutdown()
    else:
        sync.follow()
    result["left"] = [engine.has_unfinished_requests(), engine.stats().blocks_in_use]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, result)
    if sync.rank == 0:
        with open(out_path, "w") as f:
            json.dump(gathered, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
