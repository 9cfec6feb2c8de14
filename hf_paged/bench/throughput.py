"""`hf-paged bench throughput`: one workload through four systems, one after the other, in one process.

Systems (letters as in --systems):
  a  HF `generate`, FCFS static batches of --batch-size, left-padded, sdpa, DynamicCache (the vLLM paper's baseline)
  b  HF continuous batching (transformers' ContinuousBatchingManager, what `generate_batch` runs), CUDA graphs on GPU
  c  HF `generate(cache_implementation="paged")`: hf_paged's PagedCache, the same static batches as (a)
  d  the hf_paged engine (`LLM`): continuous batching, chunked prefill, paged KV
hf_paged/bench/systems.py runs them; this module is the command around them, its table and its plot.

Outputs are forced: each request produces exactly its output_len tokens (EOS ignored). Static batches run to the
batch's longest output (max_new_tokens = min_new_tokens = that) and only each request's own output_len counts as
useful output. See docs/benchmarks.md for every figure's definition, the HBM roofline included.

    hf-paged bench throughput --model llama2-7b --workload sharegpt --out run.json --plot run.png   # on a GPU
    hf-paged bench throughput --model tiny --num-requests 8 --systems a,b,c,d                      # CPU smoke
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import platform
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from hf_paged.bench import environment_knobs
from hf_paged.bench.roofline import ModelFacts, kv_capacity_tokens, measure_device, roofline, step_roofline
from hf_paged.bench.systems import SYSTEMS, SystemResult, run_system
from hf_paged.bench.workloads import MODEL_SHAPES, WORKLOADS, build_model, sample_workload
from hf_paged.blocks import DEFAULT_BLOCK_SIZE

SHORT_NAMES = {"a": "HF generate\nDynamicCache", "b": "HF continuous\nbatching", "c": "HF generate\nPagedCache",
               "d": "hf_paged\nengine"}
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


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


def format_steps(result: SystemResult) -> str:
    """The engine's decode steps by batch size against what the roofline charges them (markdown)."""
    lines = [f"({result.system}) decode steps by batch size", "| sequences | steps | share of decode time | mean ms |"
             " roofline ms | vs roofline |", "|---|---|---|---|---|---|"]
    for row in result.extra["decode_by_batch"]:
        lines.append(f"| {row['batch']} | {row['steps']} | {row['share_of_decode']:.1%} | {row['mean_ms']:.3f} | "
                     f"{row['roofline_ms']:.3f} | {row['vs_roofline']:.3f} |")
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
    if args.plot and importlib.util.find_spec("matplotlib") is None:  # said now, not after the runs
        parser.error("--plot needs matplotlib (the 'bench' extra): pip install 'hf_paged[bench]'")
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
                     "python": platform.python_version()}, "environment": environment_knobs(),
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
        if "decode_by_batch" in result.extra:
            result.extra["decode_by_batch"] = step_roofline(result.extra["decode_by_batch"], facts,
                                                            device["copy_gbps"], device["matmul_tflops"])
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
    for result in results:
        if result.extra.get("decode_by_batch"):
            print(format_steps(result))
    if args.plot:
        plot(report, args.plot)
    return 1 if any(r.error for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
