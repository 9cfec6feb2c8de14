"""`hf-paged bench throughput`: one workload through four systems, one after the other, in one process.

Systems (letters as in --systems):
  a  HF `generate`, FCFS static batches of --batch-size, left-padded, sdpa, DynamicCache (the vLLM paper's baseline)
  b  HF continuous batching (transformers' ContinuousBatchingManager, what `generate_batch` runs), CUDA graphs on GPU
  c  HF `generate(cache_implementation="paged")`: hf_paged's PagedCache, the same static batches as (a)
  d  the hf_paged engine (`LLM`): continuous batching, chunked prefill, paged KV

Outputs are forced: each request produces exactly its output_len tokens (EOS ignored). Static batches run to the
batch's longest output (max_new_tokens = min_new_tokens = that) and only each request's own output_len counts as
useful output. See docs/benchmarks.md for every figure's definition, the HBM roofline included.

    hf-paged bench throughput --model llama2-7b --workload sharegpt --out run.json --plot run.png   # on a GPU
    hf-paged bench throughput --model tiny --num-requests 8 --systems a,b,c,d                      # CPU smoke
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from hf_paged.bench.roofline import ModelFacts, kv_capacity_tokens, measure_device, roofline
from hf_paged.bench.workloads import MODEL_SHAPES, WORKLOADS, Request, build_model, make_requests, sample_workload
from hf_paged.blocks import DEFAULT_BLOCK_SIZE

SYSTEMS = {
    "a": "HF generate, static batches, DynamicCache",
    "b": "HF continuous batching",
    "c": "HF generate, static batches, PagedCache",
    "d": "hf_paged engine (LLM)",
}
SHORT_NAMES = {"a": "HF generate\nDynamicCache", "b": "HF continuous\nbatching", "c": "HF generate\nPagedCache",
               "d": "hf_paged\nengine"}
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass(slots=True)
class SystemResult:
    system: str
    name: str
    num_requests: int  # requests run (fewer than the workload's when a time budget capped a static system)
    capped: bool = False
    elapsed_s: float | None = None  # start to the last completion (warm-up, graph capture and pool set-up excluded)
    requests_per_s: float | None = None
    output_tok_per_s: float | None = None  # each request's own output_len only
    total_tok_per_s: float | None = None  # prompt + own output tokens
    output_tokens: int = 0  # sum of the run requests' output_len
    generated_tokens: int = 0  # every token generated (static batches: each row runs to the batch's longest)
    outputs_ok: bool = False  # every request got its forced tokens (static rows: exactly the batch's max_new_tokens)
    peak_memory_bytes: int | None = None  # torch.cuda.max_memory_allocated, reset before the system
    kv_waste: float | None = None  # KV slots at their peak not holding a request's own prompt/output tokens
    cache_waste: float | None = None  # the cache's own empty slots (padding, partial blocks)
    latency_p50_s: float | None = None  # per-request completion time from the start
    latency_p99_s: float | None = None
    vs_a: float | None = None  # output tok/s over system (a)'s
    vs_b: float | None = None  # output tok/s over system (b)'s
    vs_roofline: float | None = None  # output tok/s over the roofline's
    warmup_s: float | None = None
    extra: dict = field(default_factory=dict)
    error: str | None = None


# ------------------------------------------------------------------------------------------------ the systems
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _left_pad(prompts: list[list[int]], device: torch.device, pad_token_id: int = 0):
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)  # (B, L)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)  # (B, L)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt)
        mask[row, width - len(prompt):] = 1
    return ids.to(device), mask.to(device)


def _generate(model, batch: list[Request], paged: bool, block_size: int):
    from transformers import GenerationConfig

    ids, mask = _left_pad([p for p, _ in batch], model.device)
    n = max(o for _, o in batch)
    paged_kw = {"cache_implementation": "paged", "cache_config": {"block_size": block_size}} if paged else {}
    config = GenerationConfig(max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0,
                              eos_token_id=model.generation_config.eos_token_id, return_dict_in_generate=True,
                              **paged_kw)
    out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
    return out, out.sequences.shape[1] - ids.shape[1], n


def run_static(model, requests: list[Request], args, paged: bool, result: SystemResult, facts: ModelFacts) -> list:
    """FCFS static batches through `generate`; every request of a batch finishes when the batch does."""
    _generate(model, make_requests([(8, 4), (5, 4)], model.config.vocab_size, seed=1), paged, args.block_size)
    finish, slots, held, useful = [], 0.0, 0, 0
    bar = tqdm(total=len(requests), desc=f"({result.system}) {result.name}", unit="req", disable=None)
    start = time.perf_counter()
    for first in range(0, len(requests), args.batch_size):
        if args.time_budget is not None and finish and time.perf_counter() - start > args.time_budget:
            result.capped = True
            break
        batch = requests[first: first + args.batch_size]
        out, new_tokens, n = _generate(model, batch, paged, args.block_size)
        _sync(model.device)
        finish += [time.perf_counter() - start] * len(batch)
        result.outputs_ok = (new_tokens == n) and (result.outputs_ok or first == 0)
        result.generated_tokens += new_tokens * len(batch)
        # NOTE: at a batch's end its cache holds prompt + new_tokens - 1 positions per row: its peak.
        if paged:
            stats = out.cache.stats()
            slots, held = slots + stats.bytes_in_use / facts.kv_bytes_per_token, held + stats.tokens_stored
        else:
            nbytes = sum(layer.keys.nbytes + layer.values.nbytes for layer in out.cache.layers)
            slots, held = slots + nbytes / facts.kv_bytes_per_token, held + sum(len(p) + n - 1 for p, _ in batch)
        useful += sum(len(p) + o - 1 for p, o in batch)
        del out
        bar.update(len(batch))
    bar.close()
    result.kv_waste, result.cache_waste = 1 - useful / slots, 1 - held / slots
    return finish


def _kv_budget_blocks(kv_budget: int, facts: ModelFacts, page_size: int) -> int:
    return max(1, kv_budget // (page_size * facts.kv_bytes_per_token))


def run_hf_cb(model, requests: list[Request], args, result: SystemResult, facts: ModelFacts,
              kv_budget: int | None) -> list:
    """transformers' continuous batching, fed one request per output length (generate_batch takes only one)."""
    from transformers import ContinuousBatchingConfig, GenerationConfig
    from transformers.generation.continuous_batching.utils import WorkloadHints

    if model.device.type == "cuda":
        sizing = {} if kv_budget is None else {"num_blocks": _kv_budget_blocks(kv_budget, facts, 256)}
        cb_config = ContinuousBatchingConfig(use_cuda_graph=True, **sizing)
    else:  # NOTE: the default sizing would take several GB of host memory for cache and masks
        cb_config = ContinuousBatchingConfig(num_blocks=_kv_budget_blocks(kv_budget, facts, 256),
                                             max_batch_tokens=args.max_num_batched_tokens or 8192)
    max_out = max(o for _, o in requests)
    gen_config = GenerationConfig(do_sample=False, max_new_tokens=max_out, eos_token_id=-1, pad_token_id=0)
    hints = WorkloadHints(max(len(p) for p, _ in requests), max_out, len(requests))
    finish, produced = [None] * len(requests), [0] * len(requests)
    bar = tqdm(total=len(requests), desc=f"({result.system}) {result.name}", unit="req", disable=None)
    setup = time.perf_counter()
    with model.continuous_batching_context_manager(generation_config=gen_config, continuous_batching_config=cb_config,
                                                   block=True, timeout=30, workload_hints=hints) as manager:
        result.warmup_s = time.perf_counter() - setup
        start = time.perf_counter()
        for i, (prompt, output_len) in enumerate(requests):
            manager.add_request(prompt, request_id=str(i), max_new_tokens=output_len, eos_token_id=-1)
        done = 0
        while done < len(requests):
            out = manager.get_result(timeout=1)
            if out is None:
                if not manager.is_running():
                    raise RuntimeError(f"HF continuous batching stopped after {done} of {len(requests)} requests")
                continue
            if out.error is not None:
                raise RuntimeError(f"HF continuous batching, request {out.request_id}: {out.error}")
            if out.is_finished():
                i = int(out.request_id)
                finish[i], produced[i] = time.perf_counter() - start, len(out.generated_tokens)
                done += 1
                bar.update(1)
    bar.close()
    result.generated_tokens = sum(produced)
    result.outputs_ok = produced == [o for _, o in requests]
    result.extra["config"] = {"num_blocks": cb_config.num_blocks, "max_batch_tokens": cb_config.max_batch_tokens,
                              "use_cuda_graph": cb_config.use_cuda_graph, "attn": model.config._attn_implementation}
    return finish


@dataclass(slots=True)
class EngineRun:
    finish: list[float]  # seconds from the start to each request's completion, in request order
    produced: list[int]  # tokens of each request's first output
    peak_blocks: int  # most KV blocks in use after any step
    held_at_peak: int  # tokens in the KV of the running sequences at that step
    decode_steps: list[float] = field(default_factory=list)  # wall seconds of each step that only decoded
    other_steps: list[float] = field(default_factory=list)  # steps with prefill chunks


def drive_engine(llm, prompts: list[list[int]], params: list, desc: str = "") -> EngineRun:
    """Run requests through the engine as `LLM.generate` does (add them all, step until done), per-request timed."""
    engine = llm.engine
    run = EngineRun([0.0] * len(prompts), [0] * len(prompts), 0, 0)
    bar = tqdm(total=len(prompts), desc=desc, unit="req", disable=None)
    start = time.perf_counter()
    for i, (prompt, p) in enumerate(zip(prompts, params)):
        engine.add_request(f"bench-{i}", prompt, p)
    while engine.has_unfinished_requests():
        computed, running, began = engine.computed_tokens, engine.scheduler.num_running_seqs(), time.perf_counter()
        outputs = engine.step(only_finished=True)
        # A decode-only step computes at most one token per sequence that was running.
        kind = run.decode_steps if engine.computed_tokens - computed <= running else run.other_steps
        kind.append(time.perf_counter() - began)
        for out in outputs:
            if out.finished:
                i = int(out.request_id.removeprefix("bench-"))
                run.finish[i], run.produced[i] = time.perf_counter() - start, len(out.outputs[0].token_ids)
                bar.update(1)
        blocks = llm.get_stats().blocks_in_use
        if blocks > run.peak_blocks:
            run.peak_blocks = blocks
            run.held_at_peak = sum(s.num_computed_tokens for r in engine.requests.values() for s in r.sequences)
    bar.close()
    return run


def run_engine(model, requests: list[Request], args, result: SystemResult, kv_budget: int | None) -> list:
    """The hf_paged engine: per-request max_tokens = output_len, EOS ignored."""
    from hf_paged import LLM, SamplingParams

    setup = time.perf_counter()
    llm = LLM(model, block_size=args.block_size, kv_cache_memory=kv_budget, max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens, async_scheduling=args.async_scheduling,
              enable_cuda_graphs=args.cuda_graphs, compile_model=args.compile,
              fuse_projections=args.fuse_projections)
    warm = make_requests([(64, 4), (16, 4)], model.config.vocab_size, seed=1)
    llm.generate([p for p, _ in warm], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    result.warmup_s = time.perf_counter() - setup
    params = [SamplingParams(temperature=0, max_tokens=o, ignore_eos=True) for _, o in requests]
    compiled_before = _compiled_graphs()
    run = drive_engine(llm, [p for p, _ in requests], params, f"({result.system}) {result.name}")
    stats = llm.get_stats()
    result.generated_tokens = sum(run.produced)
    result.outputs_ok = run.produced == [o for _, o in requests]
    result.kv_waste = result.cache_waste = 1 - run.held_at_peak / (run.peak_blocks * args.block_size)
    result.extra.update(num_blocks=stats.num_blocks, peak_blocks_in_use=run.peak_blocks,
                        num_preemptions=stats.num_preemptions, max_num_seqs=llm.engine.config.max_num_seqs,
                        max_num_batched_tokens=llm.engine.config.max_num_batched_tokens,
                        async_scheduling=args.async_scheduling, cuda_graphs=args.cuda_graphs,
                        compile_model=llm.engine.config.compile_model, fuse_projections=llm.engine.config.fuse_projections,
                        decode_steps=len(run.decode_steps), other_steps=len(run.other_steps),
                        decode_step_ms_mean=1e3 * sum(run.decode_steps) / max(1, len(run.decode_steps)),
                        other_steps_s=sum(run.other_steps),
                        slowest_step_s=max(run.decode_steps + run.other_steps, default=0.0),
                        compilations_in_run=_compiled_graphs() - compiled_before)
    return run.finish


def _compiled_graphs() -> int:
    """Graphs torch.compile has compiled in this process (a compilation inside a timed run shows up here)."""
    import torch._dynamo.utils

    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]  # nearest rank


def run_system(key: str, model, requests: list[Request], args, facts: ModelFacts, kv_budget: int | None):
    result = SystemResult(key, SYSTEMS[key], len(requests))
    device = model.device
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    try:
        if key in "ac":
            finish = run_static(model, requests, args, key == "c", result, facts)
        elif key == "b":
            finish = run_hf_cb(model, requests, args, result, facts, kv_budget)
        else:
            finish = run_engine(model, requests, args, result, kv_budget)
    except Exception as exc:  # noqa: BLE001 - recorded in the JSON, printed, and the exit status is 1
        traceback.print_exc()
        result.error = f"{type(exc).__name__}: {exc}"[:2000]
        return result
    finally:
        if device.type == "cuda":
            result.peak_memory_bytes = torch.cuda.max_memory_allocated(device)
    ran = requests[: len(finish)]
    result.num_requests = len(ran)
    result.output_tokens = sum(o for _, o in ran)
    result.elapsed_s = max(finish)
    result.requests_per_s = len(ran) / result.elapsed_s
    result.output_tok_per_s = result.output_tokens / result.elapsed_s
    result.total_tok_per_s = (result.output_tokens + sum(len(p) for p, _ in ran)) / result.elapsed_s
    result.latency_p50_s, result.latency_p99_s = _percentile(finish, 0.5), _percentile(finish, 0.99)
    return result


# ------------------------------------------------------------------------------------------------ report
def format_table(results: list[SystemResult], roof: dict) -> str:
    def cell(x, fmt):
        return "-" if x is None else format(x, fmt)

    head = (f"{'system':<56} {'reqs':>5} {'req/s':>7} {'out tok/s':>10} {'tot tok/s':>10} {'peak GiB':>8} "
            f"{'kv waste':>8} {'p50 s':>7} {'p99 s':>7} {'vs a':>6} {'vs b':>6} {'vs roof':>7}")
    lines = [head, "-" * len(head)]
    for r in results:
        name = f"({r.system}) {r.name}" + (" [capped]" if r.capped else "")
        if r.error:
            lines.append(f"{name:<56} {r.num_requests:>5} FAILED: {r.error[:80]}")
            continue
        mem = None if r.peak_memory_bytes is None else r.peak_memory_bytes / 2**30
        lines.append(
            f"{name:<56} {r.num_requests:>5} {r.requests_per_s:>7.2f} {r.output_tok_per_s:>10.1f} "
            f"{r.total_tok_per_s:>10.1f} {cell(mem, '8.1f'):>8} {cell(r.kv_waste, '8.1%'):>8} "
            f"{r.latency_p50_s:>7.3g} {r.latency_p99_s:>7.3g} {cell(r.vs_a, '6.2f'):>6} {cell(r.vs_b, '6.2f'):>6} "
            f"{cell(r.vs_roofline, '7.3f'):>7}")
    lines.append(f"{'HBM roofline (estimate)':<56} {'':>5} {roof['requests_per_s']:>7.2f} "
                 f"{roof['output_tok_per_s']:>10.1f} {roof['total_tok_per_s']:>10.1f}")
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in report["systems"] if not r["error"]]
    labels = [f"({r['system']}) {SHORT_NAMES[r['system'][0]]}" + ("\n[capped]" if r["capped"] else "") for r in ok]
    panels = [("output tok/s", [r["output_tok_per_s"] for r in ok]),
              ("latency p50 / p99 (s)", None)]
    if any(r["peak_memory_bytes"] for r in ok):
        panels.append(("peak GPU memory (GiB)", [(r["peak_memory_bytes"] or 0) / 2**30 for r in ok]))
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5))
    for ax, (title, values) in zip(axes, panels):
        x = range(len(ok))
        if values is None:
            ax.bar([i - 0.2 for i in x], [r["latency_p50_s"] for r in ok], 0.4, label="p50")
            ax.bar([i + 0.2 for i in x], [r["latency_p99_s"] for r in ok], 0.4, label="p99")
            ax.legend()
        else:
            ax.bar(x, values)
        if title == "output tok/s":
            ax.axhline(report["roofline"]["output_tok_per_s"], color="k", ls="--", label="HBM roofline (estimate)")
            ax.set_yscale("log")
            ax.legend()
        ax.set_xticks(list(x), labels, fontsize=7)
        ax.set_title(title)
    w = report["workload"]
    fig.suptitle(f"{report['model']} {report['dtype']} on {report['device']['name']}: {w['name']}, "
                 f"{w['num_requests']} requests, mean {w['mean_prompt_len']:.0f} in / {w['mean_output_len']:.0f} out")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _size(text: str) -> int:
    units = {"gib": 2**30, "mib": 2**20, "kib": 2**10, "gb": 10**9, "mb": 10**6}
    for unit, factor in units.items():
        if text.lower().endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


VARIANT_KEYS = {"block_size": int, "max_num_seqs": int, "max_num_batched_tokens": int, "compile": bool,
                "async_scheduling": bool, "cuda_graphs": bool, "fuse_projections": bool}


def _variant(text: str, args) -> tuple[str, argparse.Namespace]:
    """'eager:compile=false,block_size=16' -> ('eager', a copy of args with those settings)."""
    label, _, settings = text.partition(":")
    if not label or not settings or not label.replace("-", "").replace("_", "").isalnum():
        raise ValueError(f"--variant {text!r}: write LABEL:KEY=VALUE[,KEY=VALUE...]")
    changed = argparse.Namespace(**vars(args))
    for item in settings.split(","):
        key, _, value = item.partition("=")
        kind = VARIANT_KEYS.get(key.strip())
        if kind is None:
            raise ValueError(f"--variant {text!r}: unknown setting {key!r}; use {', '.join(VARIANT_KEYS)}")
        value = value.strip().lower()
        if kind is bool:
            if value not in ("true", "false", "1", "0", "on", "off"):
                raise ValueError(f"--variant {text!r}: {key} takes true or false, got {value!r}")
            setattr(changed, key.strip(), value in ("true", "1", "on"))
        else:
            try:
                setattr(changed, key.strip(), kind(value))
            except ValueError:
                raise ValueError(f"--variant {text!r}: {key} takes a number, got {value!r}") from None
    return label, changed


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="hf-paged bench throughput", description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODEL_SHAPES), default="llama2-7b")
    parser.add_argument("--workload", choices=WORKLOADS, default="sharegpt")
    parser.add_argument("--num-requests", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--systems", default="a,b,c,d", help="comma-separated letters from " + ", ".join(SYSTEMS))
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--device", help="default: cuda when available, else cpu")
    parser.add_argument("--output-len", choices=("dataset", "fixed"), default="dataset")
    parser.add_argument("--output-len-value", type=int, default=128, help="the output length with --output-len fixed")
    parser.add_argument("--lognormal-mean-in", type=float, default=154)
    parser.add_argument("--lognormal-mean-out", type=float, default=295)
    parser.add_argument("--batch-size", type=int, default=32, help="static batch size of (a) and (c)")
    parser.add_argument("--block-size", type=int, default=DEFAULT_BLOCK_SIZE, help="hf_paged's tokens per KV block")
    parser.add_argument("--max-num-seqs", type=int, default=None,
                        help="engine (d): sequences running at once (default: the LLM's, 1024 on a GPU of 70 GiB or "
                             "more but an A100, else 256)")
    parser.add_argument("--max-num-batched-tokens", type=int, default=None,
                        help="engine (d): tokens per step (default: the LLM's, 16384 on such a GPU, else 8192); "
                             "(b) on CPU: its max_batch_tokens (default 8192)")
    parser.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=True,
                        help="engine (d): prepare step N+1 while the device runs step N")
    parser.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=True,
                        help="engine (d): replay CUDA graphs for decode steps")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="engine (d): torch.compile the engine's forwards (default: the LLM's, i.e. on for a "
                             "model on one GPU, off on CPU)")
    parser.add_argument("--fuse-projections", action=argparse.BooleanOptionalAction, default=None,
                        help="engine (d): q/k/v and gate/up as one matmul each (default: the LLM's, on a GPU)")
    parser.add_argument("--kv-cache-memory", type=_size, help="KV pool of (b) and (d), e.g. 40GiB (GPU default: "
                        "their own, ~90%% of memory; CPU default: enough for every request at once)")
    parser.add_argument("--time-budget", type=float, help="(a), (c): start no new static batch after this many "
                        "seconds; their figures then cover the batches run ('capped')")
    parser.add_argument("--variant", action="append", default=[], metavar="LABEL:KEY=VALUE,...",
                        help="also run the engine (d) with these settings changed, in the same process, as system "
                             f"d:LABEL (keys: {', '.join(VARIANT_KEYS)}; e.g. eager:compile=false); repeatable")
    parser.add_argument("--out", type=Path, help="write the JSON report here (rewritten after each system)")
    parser.add_argument("--plot", type=Path, help="write a PNG chart here")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.systems.split(",")) - set(SYSTEMS))
    if unknown:
        parser.error(f"unknown systems {unknown}; choose from {sorted(SYSTEMS)}")
    try:
        args.variants = [_variant(text, args) for text in args.variant]
    except ValueError as exc:
        parser.error(str(exc))
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    args.dtype = args.dtype or ("bfloat16" if args.device.type == "cuda" else "float32")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    import transformers

    import hf_paged  # noqa: F401 - installs the "paged" generate routing

    dtype = DTYPES[args.dtype]
    model = build_model(args.model, dtype, args.device, args.seed)
    facts = ModelFacts.of(model)
    fixed = args.output_len_value if args.output_len == "fixed" else None
    lognormal = {"mean_in": args.lognormal_mean_in, "mean_out": args.lognormal_mean_out}
    requests = sample_workload(args.workload, args.num_requests, model.config.vocab_size, args.seed, fixed,
                               **(lognormal if args.workload == "lognormal" else {}))
    lengths = [(len(p), o) for p, o in requests]
    device = measure_device(args.device, dtype)
    kv_budget = args.kv_cache_memory
    if kv_budget is None and args.device.type != "cuda":  # enough for every request at once, a block of slack each
        blocks = sum(math.ceil((p + o) / args.block_size) + 1 for p, o in lengths)
        kv_budget = blocks * args.block_size * facts.kv_bytes_per_token
    capacity = kv_capacity_tokens(model, facts, device, kv_budget)
    roof = roofline(lengths, facts, capacity, device["copy_gbps"], device["matmul_tflops"])
    report = {
        "bench": "throughput", "command": "hf-paged bench throughput " + " ".join(argv),
        "model": args.model, "dtype": args.dtype, "model_facts": asdict(facts), "device": device,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
        "workload": {"name": args.workload, "num_requests": len(requests), "seed": args.seed,
                     "output_len": args.output_len if fixed is None else f"fixed {fixed}",
                     "mean_prompt_len": sum(p for p, _ in lengths) / len(lengths),
                     "mean_output_len": sum(o for _, o in lengths) / len(lengths),
                     "max_prompt_len": max(p for p, _ in lengths), "max_output_len": max(o for _, o in lengths)},
        "settings": {"batch_size": args.batch_size, "block_size": args.block_size, "max_num_seqs": args.max_num_seqs,
                     "max_num_batched_tokens": args.max_num_batched_tokens, "kv_cache_memory": kv_budget,
                     "time_budget_s": args.time_budget},
        "roofline": roof, "systems": [],
    }
    print(f"{args.model} {args.dtype} on {device['name']}: copy {device['copy_gbps']:.0f} GB/s, "
          f"matmul {device['matmul_tflops']:.3g} TFLOP/s; roofline {roof['output_tok_per_s']:.0f} out tok/s")
    results = []
    runs = [(key, args, "") for key in args.systems.split(",")]
    runs += [("d", variant_args, f":{label}") for label, variant_args in args.variants]
    for key, run_args, suffix in runs:
        result = run_system(key, model, requests, run_args, facts, kv_budget)
        result.system, result.name = key + suffix, result.name + (f" [{suffix[1:]}]" if suffix else "")
        results.append(result)
        base_a = next((r for r in results if r.system == "a" and not r.error), None)
        base_b = next((r for r in results if r.system == "b" and not r.error), None)
        for r in results:
            if not r.error:
                r.vs_a = r.output_tok_per_s / base_a.output_tok_per_s if base_a else None
                r.vs_b = r.output_tok_per_s / base_b.output_tok_per_s if base_b else None
                r.vs_roofline = r.output_tok_per_s / roof["output_tok_per_s"]
        report["systems"] = [asdict(r) for r in results]
        print(format_table([result], roof).splitlines()[-2], flush=True)
        if args.out:
            args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(format_table(results, roof))
    if args.plot:
        plot(report, args.plot)
    return 1 if any(r.error for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
