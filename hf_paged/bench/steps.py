"""`hf-paged bench steps`: where one engine decode step's time goes.

A steady decode batch (`--batch` sequences, each `--context` tokens long, or `--ragged`: contexts of that mean
spread as a serving batch's; several batch sizes: `--batch 1,8,128`) is stepped `--steps` times, first timed, then
under torch.profiler. It reports the wall time of a step, the device time its kernels add up to (the rest is the
device waiting for the host), the host's own time per step (the wall time less its wait for the sampled tokens), the
number of kernels per step, the kernel time by kind: matmuls, hf_paged's paged-attention kernels, and everything
else (norms, rotary, activations, copies), and the rate at which the matmuls read the weights. The first setting is
the LLM's defaults (on a GPU: CUDA graphs, async scheduling, compiled forwards). `--compare` adds eager forwards
(where the default compiles) and fully eager steps without async scheduling; `--compile` adds compiled forwards
where the default does not compile (CPU). `--sync-debug` counts the operations that synchronise the host with the
GPU inside the timed steps (torch's sync debug mode).

    python -m hf_paged.bench.steps --model llama2-7b --batch 1,16,128 --context 512 --compare --out steps.json
    python -m hf_paged.bench.steps --model tiny --device cpu --batch 8 --context 32   # CPU smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from hf_paged.bench import environment_knobs
from hf_paged.bench.roofline import ModelFacts
from hf_paged.bench.workloads import MODEL_SHAPES, build_model, serving_lengths
from hf_paged.blocks import DEFAULT_BLOCK_SIZE
from hf_paged.engine.llm import compile_by_default
from hf_paged.engine.sampler import SampledBatch
from hf_paged.patches.generate import paged_attention

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
MATMUL = ("gemm", "cutlass", "nvjet", "xmma", "cublas", "aten::mm", "aten::addmm", "aten::bmm", "aten::matmul",
          "_skinny_kernel", "_skinny_stream_kernel")  # the last two: kernels/skinny_matmul.py (HF_PAGED_SKINNY_MATMUL)
PAGED = ("_decode_kernel", "_reduce_kernel", "_prefill_kernel", "_write_kv", "kv_write", "_copy_blocks", "paged")


@dataclass(slots=True)
class StepProfile:
    setting: str  # e.g. "cuda graphs + async scheduling"
    batch: int
    step_ms: float  # wall time per decode step (timed run, no profiler)
    wait_ms: float  # of which the host waited for sampled tokens (the rest is host work: scheduling, packing, ...)
    kernel_ms: float  # device (CPU: operator) time per step, summed over kernels
    kernels_per_step: float
    by_kind_ms: dict[str, float] = field(default_factory=dict)  # matmul / paged attention / other
    top: list[tuple[str, float]] = field(default_factory=list)  # the costliest kernels, ms per step
    matmul_gbps: float = 0.0  # weight bytes read per step over the matmul time
    syncs: dict[str, int] = field(default_factory=dict)  # --sync-debug: synchronising operations in the timed steps

    @property
    def host_ms(self) -> float:
        return self.step_ms - self.wait_ms

    @property
    def busy(self) -> float:
        return self.kernel_ms / self.step_ms if self.step_ms else 0.0


def _kind(name: str) -> str:
    lowered = name.lower()
    if any(k.lower() in lowered for k in PAGED):
        return "paged attention"
    if any(k.lower() in lowered for k in MATMUL):
        return "matmul"
    return "other"


def _kernel_rows(prof, on_gpu: bool) -> list[tuple[str, float, int]]:
    """(name, self time in ms, calls) of every kernel (GPU) or leaf operator (CPU) the profiler saw."""
    rows = []
    for row in prof.key_averages():
        if on_gpu:
            device = getattr(row, "self_device_time_total", None)
            if device is None:
                device = row.self_cuda_time_total
            if device > 0 and row.self_cpu_time_total == 0:  # a kernel, not the operator that launched it
                rows.append((row.key, device / 1e3, row.count))
        elif row.key.startswith("aten::") and row.self_cpu_time_total > 0:
            rows.append((row.key, row.self_cpu_time_total / 1e3, row.count))
    return rows


def _steady_batch(model, args, batch: int, graphs: bool, async_scheduling: bool, compile_model: bool,
                  fuse_projections: bool | None):
    from hf_paged import LLM, SamplingParams

    lengths = serving_lengths(batch, args.context) if args.ragged else [args.context] * batch
    blocks = sum(-(-(n + args.steps * 3 + 16) // DEFAULT_BLOCK_SIZE) + 1 for n in lengths)
    llm = LLM(model, block_size=DEFAULT_BLOCK_SIZE, num_blocks=blocks, max_num_seqs=batch,
              max_num_batched_tokens=max(2048, max(lengths)), enable_cuda_graphs=graphs,
              async_scheduling=async_scheduling, compile_model=compile_model,
              fuse_projections=fuse_projections)
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    params = SamplingParams(temperature=0, max_tokens=args.steps * 3 + 8, ignore_eos=True)
    for i, n in enumerate(lengths):
        prompt = torch.randint(3, vocab, (n,), generator=gen).tolist()
        llm.engine.add_request(f"steps-{i}", prompt, params)
    return llm, sum(lengths)


def profile_setting(model, args, batch: int, graphs: bool, async_scheduling: bool, compile_model: bool = False,
                    fuse_projections: bool | None = None) -> StepProfile:
    """Bring `batch` sequences to steady decode, time `args.steps` steps, then profile as many."""
    from torch.profiler import ProfilerActivity, profile

    llm, prompt_tokens = _steady_batch(model, args, batch, graphs, async_scheduling, compile_model, fuse_projections)
    engine = llm.engine
    on_gpu = model.device.type == "cuda"
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    with paged_attention(model):  # once for the run, as LLM.generate does
        while engine.stats().prompt_tokens < prompt_tokens:  # prefill everything
            engine.step()
        for _ in range(3):  # warm up: graph capture for this batch size
            engine.step()
        sync()
        waited = [0.0]
        read_back = SampledBatch.results

        def timed_results(batch):
            start = time.perf_counter()
            try:
                return read_back(batch)
            finally:
                waited[0] += time.perf_counter() - start

        SampledBatch.results = timed_results
        try:
            with _count_syncs(args.sync_debug and on_gpu) as syncs:
                began = time.perf_counter()
                for _ in range(args.steps):
                    engine.step()
                sync()
                step_ms = 1e3 * (time.perf_counter() - began) / args.steps
        finally:
            SampledBatch.results = read_back
        wait_ms = 1e3 * waited[0] / args.steps
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
        with profile(activities=activities) as prof:
            for _ in range(args.steps):
                engine.step()
            sync()
        for request_id in list(engine.requests):
            engine.abort(request_id)
    rows = _kernel_rows(prof, on_gpu)
    by_kind: dict[str, float] = {}
    for name, ms, _ in rows:
        by_kind[_kind(name)] = by_kind.get(_kind(name), 0.0) + ms / args.steps
    top = sorted(((name[:90], ms / args.steps) for name, ms, _ in rows), key=lambda r: -r[1])[:12]
    setting = ("cuda graphs" if graphs and on_gpu else "eager") + (" + async scheduling" if async_scheduling else "")
    setting += " + compile" if compile_model else ""
    setting += " + unfused" if fuse_projections is False else ""
    weight_bytes = ModelFacts.of(model).weight_bytes_per_step
    matmul_gbps = weight_bytes / by_kind["matmul"] / 1e6 if by_kind.get("matmul") else 0.0
    return StepProfile(setting, batch, step_ms, wait_ms, sum(by_kind.values()), sum(c for *_, c in rows) / args.steps,
                       {k: round(v, 4) for k, v in sorted(by_kind.items())}, [(n, round(m, 4)) for n, m in top],
                       round(matmul_gbps, 1), syncs)


@contextlib.contextmanager
def _count_syncs(enabled: bool):
    """Count, by message, the host-device synchronisations torch reports in its sync debug mode ("warn")."""
    counts: dict[str, int] = {}
    if not enabled:
        yield counts
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield counts
        finally:
            torch.cuda.set_sync_debug_mode("default")
    for w in caught:
        key = str(w.message).splitlines()[0][:120]
        counts[key] = counts.get(key, 0) + 1


def format_report(results: list[StepProfile], args) -> str:
    context = f"contexts of mean {args.context}, ragged" if args.ragged else f"context {args.context}"
    lines = [f"decode steps of {args.model}: {context}, {args.steps} steps each",
             f"{'setting':<52} {'batch':>5} {'step ms':>8} {'host ms':>8} {'kernel ms':>9} {'busy':>6} {'kernels':>8} "
             f"{'mm GB/s':>8}  by kind (ms per step)"]
    for r in results:
        kinds = ", ".join(f"{k} {v:.3f}" for k, v in r.by_kind_ms.items())
        lines.append(f"{r.setting:<52} {r.batch:>5} {r.step_ms:>8.3f} {r.host_ms:>8.3f} {r.kernel_ms:>9.3f} "
                     f"{r.busy:>6.1%} {r.kernels_per_step:>8.0f} {r.matmul_gbps:>8.0f}  {kinds}")
        lines += [f"    sync x{n}: {message}" for message, n in r.syncs.items()]
    return "\n".join(lines)


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="hf-paged bench steps", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(MODEL_SHAPES), default="llama2-7b")
    parser.add_argument("--batch", type=_batches, default=[128],
                        help="sequences decoding at once; a comma-separated list runs each (default: 128)")
    parser.add_argument("--context", type=int, default=512, help="prompt tokens of each sequence")
    parser.add_argument("--ragged", action="store_true",
                        help="contexts spread as a serving batch's (lognormal, mean --context, up to 16x it)")
    parser.add_argument("--steps", type=int, default=20, help="decode steps timed, then as many profiled")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--device", help="default: cuda when available, else cpu")
    parser.add_argument("--compare", action="store_true", help="also run eager steps without async scheduling")
    parser.add_argument("--compile", action="store_true",
                        help="also run with compiled forwards where the default does not compile (CPU)")
    parser.add_argument("--unfused", action="store_true",
                        help="also run the defaults with q/k/v and gate/up as separate matmuls")
    parser.add_argument("--sync-debug", action="store_true",
                        help="count host-device synchronisations in the timed steps (CUDA)")
    parser.add_argument("--out", type=Path, help="write the JSON report here")
    args = parser.parse_args(argv)
    for name in ("context", "steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    return args


def _batches(text: str) -> list[int]:
    try:
        sizes = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a batch size or a comma-separated list of them: {text!r}") from None
    if min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"batch sizes must be >= 1, got {text!r}")
    return sizes


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[args.dtype or ("bfloat16" if device.type == "cuda" else "float32")]
    model = build_model(args.model, dtype, device)
    compiled = compile_by_default(model)  # the LLM's default
    settings = [(True, True, compiled, None)]
    settings += [(True, True, compiled, False)] if args.unfused else []
    settings += [(True, True, True, None)] if args.compile and not compiled else []
    settings += ([(True, True, False, None)] if compiled else []) + [(False, False, False, None)] if args.compare else []
    settings = list(dict.fromkeys(settings))
    results = [profile_setting(model, args, batch, *setting) for batch in args.batch for setting in settings]
    print(format_report(results, args))
    if args.out:
        report = {"model": args.model, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else
                  "cpu", "dtype": str(dtype), "batches": args.batch, "context": args.context, "ragged": args.ragged,
                  "steps": args.steps,
                  "weight_bytes_per_step": ModelFacts.of(model).weight_bytes_per_step,
                  "environment": environment_knobs(),
                  "results": [dict(asdict(r), busy=r.busy, host_ms=r.host_ms) for r in results]}
        args.out.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
