"""`hf-paged bench host`: the engine's host work per decode step, with the model's forward taken out.

The GPU overlaps the host's part of a step (scheduling, packing inputs, sampling launches, stop checks; docs/
how-it-works.md "Overlapped scheduling") only while that part is the shorter. This times it alone: the tiny model's
forward is replaced by one returning zero logits, and decode steps go through the CUDA-graph path's bookkeeping
(bucket padding, static buffers) with a stand-in for the replay, so it runs the same on a CPU. `--batch` sequences
with `--prompt-len` tokens each and outputs drawn from `--output-len LOW-HIGH` (forced, greedy) are stepped to the
end, `--repeats` times; each run reports the median and slowest step. `--no-freeze` runs the loop without
engine/collector.py's frozen heap, to see what Python's collector adds.

    hf-paged bench host --batch 128,512
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

from hf_paged.bench.workloads import build_model
from hf_paged.engine.collector import frozen_heap
from hf_paged.engine.cuda_graphs import DecodeGraphs, _Graph


class _NoReplay:
    def replay(self) -> None:
        pass


class _HostOnlyGraphs(DecodeGraphs):
    """The decode-graph bookkeeping with nothing captured: a replay leaves zero logits."""

    def _capture(self, b: int) -> _Graph:
        return _Graph(_NoReplay(), torch.zeros(b, self.model.config.vocab_size))


def run_once(model, batch: int, prompt_len: int, output_len: tuple[int, int], freeze: bool, seed: int) -> dict:
    from hf_paged import LLM, SamplingParams

    llm = LLM(model, num_blocks=batch * ((prompt_len + output_len[1]) // 8 + 2), block_size=8, max_num_seqs=batch,
              max_num_batched_tokens=16384)
    llm.generate([[5, 6, 7]], SamplingParams(max_tokens=2), use_tqdm=False)  # allocates the KV pools
    runner, engine = llm.engine.runner, llm.engine
    runner.graphs = _HostOnlyGraphs(model, runner.cache, min(batch, 512), -(-(prompt_len + output_len[1]) // 8),
                                    runner.decode_forward)
    vocab = model.config.vocab_size
    runner._model_forward = lambda ids, pos, plan, keep, extra=None, call=None: torch.zeros(len(keep), vocab)
    rng = random.Random(seed)
    for i in range(batch):
        engine.add_request(str(i), [rng.randrange(3, vocab) for _ in range(prompt_len)],
                           SamplingParams(temperature=0, max_tokens=rng.randint(*output_len), ignore_eos=True))
    times = []
    with frozen_heap() if freeze else contextlib.nullcontext():
        while engine.has_unfinished_requests():
            began = time.perf_counter()
            engine.step(only_finished=True)
            times.append(time.perf_counter() - began)
    decode = times[-(output_len[0] - 1):]  # steps that only decode: the prompts are in after the first few
    return {"steps": len(times), "median_step_ms": 1e3 * statistics.median(decode),
            "slowest_step_ms": 1e3 * max(times), "total_ms": 1e3 * sum(times)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hf-paged bench host", description=__doc__.splitlines()[0])
    parser.add_argument("--batch", default="128,512", help="sequences, comma separated")
    parser.add_argument("--prompt-len", type=int, default=200)
    parser.add_argument("--output-len", default="150-300", help="LOW-HIGH forced output tokens")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-freeze", action="store_true", help="step without freezing the heap")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="write the runs as JSON here")
    args = parser.parse_args(argv)
    low, high = (int(x) for x in args.output_len.split("-"))
    if not 2 <= low <= high:
        parser.error(f"--output-len {args.output_len}: need 2 <= LOW <= HIGH")
    torch.set_num_threads(1)
    model = build_model("tiny", torch.float32, "cpu", args.seed)
    report = {"command": "hf-paged bench host " + " ".join(argv if argv is not None else sys.argv[1:]),
              "freeze": not args.no_freeze, "rows": []}
    for batch in (int(x) for x in args.batch.split(",")):
        runs = [run_once(model, batch, args.prompt_len, (low, high), not args.no_freeze, args.seed)
                for _ in range(args.repeats)]
        report["rows"].append({"batch": batch, "runs": runs})
        print(f"batch {batch}: host ms per decode step, median of runs "
              f"{statistics.median(r['median_step_ms'] for r in runs):.2f} "
              f"({', '.join(format(r['median_step_ms'], '.2f') for r in runs)}); slowest step "
              f"{', '.join(format(r['slowest_step_ms'], '.0f') for r in runs)} ms; run total "
              f"{statistics.median(r['total_ms'] for r in runs):.0f} ms")
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
