"""Run under torchrun: a model loaded with transformers' tensor parallelism, generating paged on every rank."""

import json
import sys

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM

import hf_paged


def main(model_dir: str, out_path: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = AutoModelForCausalLM.from_pretrained(model_dir, tp_plan="auto").eval()
    prompts = json.loads(open(f"{model_dir}/prompts.json").read())
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = (torch.arange(width)[None] >= torch.tensor([width - len(p) for p in prompts])[:, None]).long()
    kwargs = dict(attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0, eos_token_id=None)
    greedy = model.generate(ids, cache_implementation="paged", return_dict_in_generate=True, **kwargs)
    beams = model.generate(ids, cache_implementation="paged", num_beams=3, **kwargs)
    llm = hf_paged.LLM(model, num_blocks=64, block_size=4)
    engine_greedy = llm.generate(prompts, hf_paged.SamplingParams(temperature=0, max_tokens=10, ignore_eos=True),
                                 use_tqdm=False)
    sampled = llm.generate(prompts, hf_paged.SamplingParams(temperature=1.0, max_tokens=10, ignore_eos=True),
                           use_tqdm=False)
    result = {
        "kv_heads_per_rank": greedy.cache.layers[0].keys.shape[2],
        "greedy": greedy.sequences.tolist(),
        "beams": beams.tolist(),
        "engine_greedy": [o.outputs[0].token_ids for o in engine_greedy],
        "sampled": [o.outputs[0].token_ids for o in sampled],
    }
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, result)
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(gathered, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
