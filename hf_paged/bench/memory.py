"""`hf-paged bench memory`: KV bytes of beam search and parallel sampling, paged against DynamicCache.

For each prompt length and mode (beam search of width W, parallel sampling n=W), in one process and on the same
prompts, three runs of M forced new tokens:
  DynamicCache  `generate` (num_beams=W, or do_sample with num_return_sequences=W): bytes of the cache's tensors
                at the end (its peak: W rows of prompt + M - 1 positions, the prompt copied W times)
  PagedCache    the same `generate` call with `cache_implementation="paged"`: the peak of
                `PagedCache.stats().bytes_in_use` over the steps (rows share their prompt's and ancestors' blocks)
  engine        `LLM` with `BeamSearchParams(beam_width=W)` or `SamplingParams(n=W)`: the peak of
                `get_stats().blocks_in_use` x bytes per block over the steps

    hf-paged bench memory --model llama-1b --prompt-lens 128,512 --max-new-tokens 128 --out memory.json
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

from hf_paged.bench.roofline import ModelFacts
from hf_paged.blocks import DEFAULT_BLOCK_SIZE
from hf_paged.bench.systems import drive_engine
from hf_paged.bench.throughput import DTYPES
from hf_paged.bench.workloads import MODEL_SHAPES, build_model, make_requests

MODES = ("beam", "parallel")


@dataclass(slots=True)
class Row:
    mode: str  # "beam" or "parallel"
    prompt_len: int
    system: str  # "DynamicCache", "PagedCache", "engine"
    kv_bytes: int  # at the peak
    vs_dynamic: float  # kv_bytes / DynamicCache's
    saving: float  # 1 - vs_dynamic
    waste: float | None  # the cache's empty slots at the peak (partial blocks); None where not measured


class _PeakPagedBytes(LogitsProcessor):
    """Reads the PagedCache's bytes in use once per step (logits processors run after each forward)."""

    def __init__(self, cache):
        self.cache, self.peak, self.waste = cache, 0, None

    def __call__(self, input_ids, scores):
        stats = self.cache.stats()
        if stats.bytes_in_use > self.peak:
            self.peak, self.waste = stats.bytes_in_use, stats.waste
        return scores


def _generate_kwargs(mode: str, width: int, new_tokens: int, seed: int) -> dict:
    torch.manual_seed(seed)
    forced = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "pad_token_id": 0}
    if mode == "beam":
        return {**forced, "num_beams": width, "num_return_sequences": width, "do_sample": False}
    return {**forced, "num_return_sequences": width, "do_sample": True, "top_k": 0}


def measure(model, prompt: list[int], mode: str, width: int, new_tokens: int, block_size: int,
            seed: int = 0) -> list[Row]:
    """Peak KV bytes of one prompt under `mode` for DynamicCache, PagedCache and the engine."""
    from hf_paged import LLM, BeamSearchParams, PagedCache, SamplingParams

    facts = ModelFacts.of(model)
    ids = torch.tensor([prompt], device=model.device)  # (1, P)
    mask = torch.ones_like(ids)  # (1, P); NOTE: explicit, or random ids equal to pad_token_id would read as padding
    kwargs = _generate_kwargs(mode, width, new_tokens, seed)
    out = model.generate(ids, attention_mask=mask,
                         generation_config=GenerationConfig(**kwargs, return_dict_in_generate=True))
    dynamic = sum(layer.keys.nbytes + layer.values.nbytes for layer in out.cache.layers)
    del out

    max_len = len(prompt) + new_tokens
    cache = PagedCache(model.config, num_blocks=width * (-(-(max_len + 1) // block_size) + 1),
                       block_size=block_size, dtype=model.dtype)
    probe = _PeakPagedBytes(cache)
    model.generate(ids, attention_mask=mask, cache=cache, logits_processor=LogitsProcessorList([probe]),
                   generation_config=GenerationConfig(**_generate_kwargs(mode, width, new_tokens, seed)))

    llm = LLM(model, block_size=block_size, num_blocks=width * (-(-max_len // block_size) + 1) + 8)
    if mode == "beam":
        params = BeamSearchParams(beam_width=width, max_tokens=new_tokens, ignore_eos=True)
    else:
        params = SamplingParams(n=width, temperature=1.0, max_tokens=new_tokens, ignore_eos=True, seed=seed)
    run = drive_engine(llm, [prompt], [params])
    engine_bytes = run.peak_blocks * block_size * facts.kv_bytes_per_token

    def row(system, nbytes, waste):
        return Row(mode, len(prompt), system, nbytes, nbytes / dynamic, 1 - nbytes / dynamic, waste)

    return [row("DynamicCache", dynamic, 0.0), row("PagedCache", probe.peak, probe.waste),
            row("engine", engine_bytes, None)]  # NOTE: shared blocks: tokens per sequence would count them twice


def format_table(rows: list[Row]) -> str:
    head = f"{'mode':<9} {'prompt':>6} {'system':<13} {'KV MiB':>10} {'vs dynamic':>10} {'saving':>7} {'waste':>6}"
    lines = [head, "-" * len(head)]
    for r in rows:
        waste = "-" if r.waste is None else f"{r.waste:.1%}"
        lines.append(f"{r.mode:<9} {r.prompt_len:>6} {r.system:<13} {r.kv_bytes / 2**20:>10.2f} "
                     f"{r.vs_dynamic:>10.3f} {r.saving:>7.1%} {waste:>6}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="hf-paged bench memory", description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODEL_SHAPES), default="tiny")
    parser.add_argument("--prompt-lens", default="64,256", help="comma-separated prompt lengths")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="forced new tokens per output")
    parser.add_argument("--width", type=int, default=4, help="beam width and parallel samples n")
    parser.add_argument("--modes", default="beam,parallel", help=f"comma-separated, from {MODES}")
    parser.add_argument("--block-size", type=int, default=DEFAULT_BLOCK_SIZE)
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="write the rows as JSON here")
    args = parser.parse_args(argv)
    modes = args.modes.split(",")
    if set(modes) - set(MODES):
        parser.error(f"unknown modes {sorted(set(modes) - set(MODES))}; choose from {MODES}")
    import hf_paged  # noqa: F401 - installs the "paged" generate routing

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    model = build_model(args.model, DTYPES[dtype], device, args.seed)
    lengths = [int(x) for x in args.prompt_lens.split(",")]
    prompts = make_requests([(n, args.max_new_tokens) for n in lengths], model.config.vocab_size, args.seed)
    rows = [row for mode in modes for prompt, _ in prompts
            for row in measure(model, prompt, mode, args.width, args.max_new_tokens, args.block_size, args.seed)]
    print(format_table(rows))
    if args.out:
        report = {"bench": "memory", "command": "hf-paged bench memory " + " ".join(argv), "model": args.model,
                  "dtype": dtype, "device": device.type, "width": args.width, "max_new_tokens": args.max_new_tokens,
                  "block_size": args.block_size, "rows": [asdict(r) for r in rows]}
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
