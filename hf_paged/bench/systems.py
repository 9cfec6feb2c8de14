"""The four systems of `hf-paged bench throughput`, each run over one workload and timed per request.

  a  HF `generate`, FCFS static batches, left-padded, sdpa, DynamicCache (`run_static`)
  b  HF continuous batching, transformers' ContinuousBatchingManager (`run_hf_cb`)
  c  HF `generate(cache_implementation="paged")`, the same static batches as (a) (`run_static`)
  d  the hf_paged engine, `LLM` (`run_engine`, `drive_engine`)

`run_system` runs one of them and fills a `SystemResult`; hf_paged/bench/throughput.py is the command around them.
"""

from __future__ import annotations

import gc
import math
import time
import traceback
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from hf_paged.bench.roofline import ModelFacts
from hf_paged.bench.workloads import Request, make_requests
from hf_paged.engine.collector import frozen_heap

SYSTEMS = {
    "a": "HF generate, static batches, DynamicCache",
    "b": "HF continuous batching",
    "c": "HF generate, static batches, PagedCache",
    "d": "hf_paged engine (LLM)",
}

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
    decode_batches: list[int] = field(default_factory=list)  # sequences of each decode step
    decode_kv_blocks: list[int] = field(default_factory=list)  # KV blocks in use as it began (its context)


def drive_engine(llm, prompts: list[list[int]], params: list, desc: str = "") -> EngineRun:
    """Run requests through the engine as `LLM.generate` does (add them all, step until done), per-request timed."""
    engine = llm.engine
    run = EngineRun([0.0] * len(prompts), [0] * len(prompts), 0, 0)
    bar = tqdm(total=len(prompts), desc=desc, unit="req", disable=None)
    start = time.perf_counter()
    for i, (prompt, p) in enumerate(zip(prompts, params)):
        engine.add_request(f"bench-{i}", prompt, p)
    blocks = 0  # in use after the last step: what the next one reads
    with frozen_heap():
        while engine.has_unfinished_requests():
            computed, running, began = engine.computed_tokens, engine.scheduler.num_running_seqs(), time.perf_counter()
            outputs = engine.step(only_finished=True)
            # A decode-only step computes at most one token per sequence that was running.
            decode = engine.computed_tokens - computed <= running
            (run.decode_steps if decode else run.other_steps).append(time.perf_counter() - began)
            if decode:
                run.decode_batches.append(running)
                run.decode_kv_blocks.append(blocks)
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
                        compilations_in_run=_compiled_graphs() - compiled_before,
                        decode_by_batch=decode_by_batch(run, args.block_size))
    return run.finish


BATCH_BUCKETS = ((1, 1), (2, 4), (5, 16), (17, 64), (65, 256), (257, math.inf))  # decode steps by sequences


def decode_by_batch(run: EngineRun, block_size: int) -> list[dict]:
    """The decode steps by batch size: how many, their mean wall ms, mean sequences, and the mean KV tokens they held
    (whole blocks: at most a block a sequence more than they read). bench throughput adds each bucket's roofline."""
    rows = []
    for low, high in BATCH_BUCKETS:
        steps = [(seconds, batch, blocks * block_size) for seconds, batch, blocks
                 in zip(run.decode_steps, run.decode_batches, run.decode_kv_blocks) if low <= batch <= high]
        if steps:
            label = str(low) if low == high else f"{low}+" if high == math.inf else f"{low}-{high}"
            rows.append({"batch": label, "steps": len(steps), "total_s": sum(s for s, _, _ in steps),
                         "mean_ms": 1e3 * sum(s for s, _, _ in steps) / len(steps),
                         "mean_batch": sum(b for _, b, _ in steps) / len(steps),
                         "mean_kv_tokens": sum(t for _, _, t in steps) / len(steps)})
    return rows


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
