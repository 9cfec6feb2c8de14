"""`hf-paged bench kernels`: the paged kernels' time and HBM bandwidth, next to torch on contiguous KV.

Each row times one kernel on one shape (median of `triton.testing.do_bench`, CUDA events) and divides the fewest
bytes it must move (every input read once, every output written once) by that time; the fraction is of the
device's copy bandwidth, measured here with a large device-to-device copy (bytes read + written). Attention rows
carry a baseline: torch sdpa on contiguous K/V of the same shape (decode) or the same causal work (prefill).

    hf-paged bench kernels --out bench.json          # on a GPU
    hf-paged bench kernels --tiny                    # CPU smoke: reference kernels, tiny shapes, times only
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from hf_paged.blocks import DEFAULT_BLOCK_SIZE
from hf_paged.kernels import reference

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass(slots=True)
class Row:
    kernel: str
    shape: str
    ms: float
    gbps: float | None = None  # achieved bytes / time
    frac_copy: float | None = None  # gbps / measured copy bandwidth
    tflops: float | None = None
    baseline: str | None = None
    baseline_ms: float | None = None
    baseline_frac_copy: float | None = None
    vs_baseline: float | None = None  # ms / baseline_ms (< 1: faster)
    config: str | None = None
    detail: dict | None = None  # sweep timings, sdpa backends (JSON only)


@dataclass(slots=True)
class Timer:
    gpu: bool
    copy_gbps: float | None = None

    @property
    def device(self) -> str:
        return "cuda" if self.gpu else "cpu"

    def ms(self, fn: Callable[[], object], quick: bool = False) -> float:
        if not self.gpu:
            fn()
            reps, start = 3, time.perf_counter()
            for _ in range(reps):
                fn()
            return (time.perf_counter() - start) / reps * 1e3
        import triton.testing

        return triton.testing.do_bench(fn, warmup=10 if quick else 25, rep=40 if quick else 100,
                                       return_mode="median")

    def frac(self, nbytes: int, ms: float) -> tuple[float | None, float | None]:
        if not self.gpu:
            return None, None
        gbps = nbytes / ms / 1e6
        return gbps, gbps / self.copy_gbps


def warm_up_gpu(seconds: float = 1.0) -> None:
    """Run matrix products for a while so that clocks have settled before the first timing."""
    a = torch.randn(4096, 4096, dtype=torch.bfloat16, device="cuda")
    torch.cuda.synchronize()
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(20):
            a @ a
        torch.cuda.synchronize()


def measure_copy_bandwidth(timer: Timer, nbytes: int = 2 << 30) -> float:
    """GB/s of a device-to-device copy of nbytes, counting bytes read plus bytes written."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    ms = timer.ms(lambda: dst.copy_(src))
    del src, dst
    return 2 * nbytes / ms / 1e6


def paged_pool(seq_lens, num_kv_heads, head_dim, block_size, dtype, device, gen):
    """K/V of `seq_lens` tokens per sequence in shuffled blocks: key_cache, value_cache, block_tables (int32)."""
    per_seq = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(per_seq)
    order = torch.randperm(num_blocks, generator=gen).to(torch.int32)
    block_tables = torch.zeros(len(seq_lens), max(per_seq), dtype=torch.int32)
    taken = 0
    for s, n in enumerate(per_seq):
        block_tables[s, :n] = order[taken : taken + n]
        taken += n
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    key_cache = torch.randn(shape, dtype=dtype, device=device)
    value_cache = torch.randn(shape, dtype=dtype, device=device)
    return key_cache, value_cache, block_tables.to(device)


def attention_inputs(q_lens, seq_lens, num_q_heads, num_kv_heads, head_dim, block_size, dtype, device):
    gen = torch.Generator().manual_seed(0)
    key_cache, value_cache, block_tables = paged_pool(seq_lens, num_kv_heads, head_dim, block_size, dtype, device,
                                                      gen)
    cu = torch.zeros(len(q_lens) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(q_lens).cumsum(0)
    return dict(
        query=torch.randn(int(cu[-1]), num_q_heads, head_dim, dtype=dtype, device=device),  # (T, Hq, D)
        key_cache=key_cache, value_cache=value_cache, block_tables=block_tables,
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device), cu_seqlens_q=cu.to(device),
    )


def attention_bytes(inputs, q_lens, seq_lens) -> int:
    """K/V each read once per (sequence, KV head) up to its context; queries read, outputs written; tables read."""
    kv = inputs["key_cache"]
    per_token = kv.shape[2] * kv.shape[3] * kv.element_size()
    q = inputs["query"]
    return (2 * sum(seq_lens) * per_token + 2 * q.numel() * q.element_size()
            + inputs["block_tables"].numel() * 4)


def causal_flops(q_lens, seq_lens, num_q_heads, head_dim) -> int:
    """2 matmuls x 2 flops per visible (query, key) pair."""
    pairs = sum(q * (n - q) + q * (q + 1) // 2 for q, n in zip(q_lens, seq_lens))
    return 4 * pairs * num_q_heads * head_dim


def decode_configs():
    from hf_paged.kernels.tuning import DecodeConfig

    tiles = [(32, 4, 3), (64, 4, 2), (64, 4, 3), (64, 4, 4), (64, 8, 3), (128, 4, 2), (128, 8, 3)]
    return [DecodeConfig(n, s, w, st) for s in (1, 2, 4) for n, w, st in tiles]


def prefill_configs():
    from hf_paged.kernels.tuning import PrefillConfig

    return [PrefillConfig(*c) for c in [
        (128, 32, 4, 2), (128, 32, 4, 3), (128, 32, 4, 4), (128, 32, 8, 3), (128, 64, 4, 2), (128, 64, 4, 3),
        (128, 64, 8, 2), (128, 64, 8, 3), (128, 128, 8, 2), (64, 32, 4, 3), (64, 32, 4, 4), (64, 64, 4, 3),
        (64, 64, 4, 4), (256, 32, 8, 3), (256, 64, 8, 2)]] + [  # the step's own K/V by pointer instead of TMA
        PrefillConfig(*c, tma=False) for c in [(128, 32, 4, 3), (64, 32, 4, 3), (128, 32, 8, 3), (128, 64, 8, 3)]]


def sweep_configs(timer, run, configs) -> dict[str, float]:
    """ms of each config that runs (one that needs too much shared memory is left out), fastest first."""
    times = {}
    for cfg in configs:
        try:
            times[repr(cfg)] = timer.ms(lambda: run(cfg), quick=True)
        except Exception as exc:  # noqa: BLE001 - a config the device cannot run is just left out
            print(f"  skip {cfg}: {type(exc).__name__}: {str(exc)[:120]}", file=sys.stderr)
    return dict(sorted(times.items(), key=lambda kv: kv[1]))


def bench_attention(timer, kind, q_lens, seq_lens, hq, hkv, args, rows, sweep):
    """Rows for one attention shape. Batches with prompts get two rows on a GPU: K/V read through the block tables
    only, and the engine's way, the step's own K/V passed apart (`own K/V`: only the earlier context is gathered)."""
    dtype, device = _DTYPES[args.dtype], timer.device
    inputs = attention_inputs(q_lens, seq_lens, hq, hkv, args.head_dim, args.block_size, dtype, device)
    scale = args.head_dim**-0.5
    max_q = max(q_lens)
    shape = f"{len(q_lens)}x(q{q_lens[0]},ctx{seq_lens[0]}) {hq}/{hkv}h d{args.head_dim} bs{args.block_size}"
    if kind == "mixed":
        shape = f"{len(q_lens) - 1}x(q1,ctx{seq_lens[0]})+(q{q_lens[-1]}) {hq}/{hkv}h d{args.head_dim} bs{args.block_size}"
    nbytes = attention_bytes(inputs, q_lens, seq_lens)
    flops = causal_flops(q_lens, seq_lens, hq, args.head_dim)
    baseline = _sdpa_baseline(q_lens, seq_lens, hq, hkv, args.head_dim, dtype, device)
    baseline_ms = timer.ms(baseline) if baseline is not None and kind != "mixed" else None
    variants = [False, True] if timer.gpu and max_q > 1 else [False]
    for own_kv in variants:
        new_kv = {}
        if own_kv:
            tokens = inputs["query"].shape[0]
            new_kv = {name: torch.randn(tokens, hkv, args.head_dim, dtype=dtype, device=device)  # (T, Hkv, D)
                      for name in ("key", "value")}
        if timer.gpu:
            from hf_paged.kernels.paged_attention import paged_attention

            def run(cfg=None, new_kv=new_kv):
                return paged_attention(**inputs, **new_kv, scale=scale, max_seqlen_q=max_q, config=cfg)

            name = f"paged_attention[{kind}]" + (" own K/V" if own_kv else "")
        else:
            def run(cfg=None):
                return reference.paged_attention(**inputs, scale=scale)

            name = f"reference.paged_attention[{kind}]"
        timer.ms(run, quick=True)  # NOTE: discarded; a first timing on a new shape once read 40% slow
        ms = timer.ms(run)
        row = Row(name, shape, ms, *timer.frac(nbytes, ms), tflops=flops / ms / 1e9)
        if kind == "mixed" and timer.gpu:
            # The same batch as two launches: the decode kernel over the one-token rows, the prefill kernel over
            # the rest.
            row.baseline = "split: decode kernel + prefill kernel"
            row.baseline_ms = timer.ms(_split_launch(inputs, q_lens, scale, new_kv))
            row.baseline_frac_copy = timer.frac(nbytes, row.baseline_ms)[1]
            row.vs_baseline = ms / row.baseline_ms
        elif baseline_ms is not None:
            row.baseline = "torch sdpa, contiguous KV" + (", causal" if max_q > 1 else "")
            row.baseline_ms = baseline_ms
            row.baseline_frac_copy = timer.frac(nbytes, baseline_ms)[1]
            row.vs_baseline = ms / baseline_ms
            if timer.gpu and max_q > 1 and not own_kv:
                row.detail = {"sdpa_backends_ms": _sdpa_backends(timer, baseline)}
        rows.append(row)
        if sweep and timer.gpu and kind in ("decode", "prefill"):
            times = sweep_configs(timer, run, decode_configs() if max_q == 1 else prefill_configs())
            cfg, best_ms = next(iter(times.items()))
            rows.append(Row(name + " best of sweep", shape, best_ms, *timer.frac(nbytes, best_ms),
                            tflops=flops / best_ms / 1e9, config=cfg, detail={"sweep_ms": times},
                            baseline=row.baseline, baseline_ms=row.baseline_ms, vs_baseline=(
                                best_ms / row.baseline_ms if row.baseline_ms else None)))
    del inputs


def _split_launch(inputs, q_lens, scale, new_kv=None):
    """A mixed batch (decodes first, then prefills) as a decode launch and a prefill launch on its two parts."""
    from hf_paged.kernels.paged_attention import paged_attention

    nd = next((i for i, q in enumerate(q_lens) if q != 1), len(q_lens))
    cu = inputs["cu_seqlens_q"]
    decode = dict(inputs, query=inputs["query"][:nd], block_tables=inputs["block_tables"][:nd],
                  seq_lens=inputs["seq_lens"][:nd], cu_seqlens_q=cu[: nd + 1])
    prefill = dict(inputs, query=inputs["query"][nd:], block_tables=inputs["block_tables"][nd:],
                   seq_lens=inputs["seq_lens"][nd:], cu_seqlens_q=cu[nd:] - nd,
                   **{name: t[nd:] for name, t in (new_kv or {}).items()})
    max_q = max(q_lens[nd:])

    def run():
        return torch.cat([paged_attention(**decode, scale=scale, max_seqlen_q=1),
                          paged_attention(**prefill, scale=scale, max_seqlen_q=max_q)])

    return run


def _sdpa_baseline(q_lens, seq_lens, hq, hkv, head_dim, dtype, device):
    """sdpa over contiguous [B, H, L, D] K/V when every sequence has the same shape (without a cached prefix)."""
    if len(set(q_lens)) != 1 or len(set(seq_lens)) != 1 or (q_lens[0] > 1 and q_lens[0] != seq_lens[0]):
        return None
    batch, q_len, ctx = len(q_lens), q_lens[0], seq_lens[0]
    q = torch.randn(batch, hq, q_len, head_dim, dtype=dtype, device=device)
    k = torch.randn(batch, hkv, ctx, head_dim, dtype=dtype, device=device)
    v = torch.randn(batch, hkv, ctx, head_dim, dtype=dtype, device=device)
    return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=q_len > 1, enable_gqa=hq != hkv)


def _sdpa_backends(timer, baseline) -> dict[str, float | None]:
    """ms of the sdpa baseline forced onto each fused backend (None: the backend refused the shape)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    times = {}
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
        try:
            with sdpa_kernel(backend):
                times[backend.name] = timer.ms(baseline, quick=True)
        except RuntimeError:
            times[backend.name] = None
    return times


def bench_gemm(timer, m: int, hidden: int, intermediate: int, kv_dim: int, args, rows):
    """A decode step's projections at `m` rows: the rate they read the weights at, each group as separate matmuls
    (as HF models run them) and as one matmul over the concatenated weights (as the engine runs them,
    engine/fused.py), through cuBLAS, and apart through cuBLASLt."""
    dtype, device = _DTYPES[args.dtype], timer.device
    groups = {"qkv": (hidden, [hidden, kv_dim, kv_dim]), "o": (hidden, [hidden]),
              "gate_up": (hidden, [intermediate, intermediate]), "down": (intermediate, [hidden])}
    for name, (k, outs) in groups.items():
        x = torch.randn(m, k, dtype=dtype, device=device)
        weights = [torch.randn(n, k, dtype=dtype, device=device) / k**0.5 for n in outs]
        nbytes = sum(w.numel() for w in weights) * x.element_size() + (k + sum(outs)) * m * x.element_size()
        shape = f"M={m} {k}->{'+'.join(map(str, outs))}"
        ms = timer.ms(lambda: [F.linear(x, w) for w in weights])
        rows.append(Row(f"matmul[{name}]", shape, ms, *timer.frac(nbytes, ms)))

        def vs_cublas(label, other_ms, **extra):
            rows.append(Row(f"matmul[{name}] {label}", shape, other_ms, *timer.frac(nbytes, other_ms),
                            baseline="cuBLAS, matmuls apart", baseline_ms=ms, vs_baseline=other_ms / ms, **extra))

        fused = torch.cat(weights) if len(weights) > 1 else None
        if fused is not None:
            vs_cublas("fused", timer.ms(lambda: F.linear(x, fused)))
        if timer.gpu:
            blas = torch.backends.cuda.preferred_blas_library()
            torch.backends.cuda.preferred_blas_library("cublaslt")
            try:
                vs_cublas("cuBLASLt", timer.ms(lambda: [F.linear(x, w) for w in weights]))
            finally:
                torch.backends.cuda.preferred_blas_library(blas)
        del x, weights, fused


def bench_write_kv(timer, num_tokens, hkv, args, rows):
    dtype, device = _DTYPES[args.dtype], timer.device
    cache_shape = (num_tokens // args.block_size + 8, args.block_size, hkv, args.head_dim)
    key_cache, value_cache = (torch.zeros(cache_shape, dtype=dtype, device=device) for _ in range(2))
    key, value = (torch.randn(num_tokens, hkv, args.head_dim, dtype=dtype, device=device) for _ in range(2))
    slots = torch.randperm(key_cache.shape[0] * args.block_size, device=device)[:num_tokens]
    nbytes = 4 * key.numel() * key.element_size() + slots.numel() * 8  # K, V read and written
    shape = f"{num_tokens} tokens {hkv}h d{args.head_dim} bs{args.block_size}"
    _bench_pair(timer, "write_kv", shape, nbytes, "kv_write", "write_kv",
                (key, value, key_cache, value_cache, slots), rows)


def bench_copy_blocks(timer, num_pairs, hkv, args, rows):
    dtype, device = _DTYPES[args.dtype], timer.device
    shape = (2 * num_pairs + 8, args.block_size, hkv, args.head_dim)
    key_cache, value_cache = (torch.randn(shape, dtype=dtype, device=device) for _ in range(2))
    order = torch.randperm(shape[0], device=device)
    src, dst = order[:num_pairs], order[num_pairs : 2 * num_pairs]
    nbytes = 4 * num_pairs * key_cache[0].numel() * key_cache.element_size()  # K, V blocks read and written
    _bench_pair(timer, "copy_blocks", f"{num_pairs} blocks {hkv}h d{args.head_dim} bs{args.block_size}", nbytes,
                "block_copy", "copy_blocks", (key_cache, value_cache, src, dst), rows)


def _bench_pair(timer, name, shape, nbytes, module, fn_name, call_args, rows):
    """Row for the Triton kernel (GPU) or the reference (CPU), the reference torch ops as baseline on GPU."""
    ref = getattr(reference, fn_name)
    if not timer.gpu:
        ms = timer.ms(lambda: ref(*call_args))
        rows.append(Row(f"reference.{name}", shape, ms))
        return
    import importlib

    ours = getattr(importlib.import_module(f"hf_paged.kernels.{module}"), fn_name)
    ms = timer.ms(lambda: ours(*call_args))
    row = Row(name, shape, ms, *timer.frac(nbytes, ms), baseline="torch indexing (reference)")
    row.baseline_ms = timer.ms(lambda: ref(*call_args))
    row.baseline_frac_copy = timer.frac(nbytes, row.baseline_ms)[1]
    row.vs_baseline = ms / row.baseline_ms
    rows.append(row)


def format_table(rows: list[Row]) -> str:
    def cell(x, width, prec, times=1.0):
        return f"{'-' if x is None else format(x * times, f'.{prec}f'):>{width}}"

    head = (f"{'kernel':<44} {'shape':<34} {'ms':>8} {'GB/s':>6} {'%copy':>6} {'TFLOP/s':>7} "
            f"{'base ms':>8} {'base%copy':>9} {'vs base':>7}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r.kernel:<44} {r.shape:<34} {r.ms:>8.4f} {cell(r.gbps, 6, 0)} {cell(r.frac_copy, 6, 1, 100)} "
            f"{cell(r.tflops, 7, 1)} {cell(r.baseline_ms, 8, 4)} {cell(r.baseline_frac_copy, 9, 1, 100)} "
            f"{cell(r.vs_baseline, 7, 2)}" + (f"  {r.config}" if r.config else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hf-paged bench kernels", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write the rows and device facts as JSON here")
    parser.add_argument("--tiny", action="store_true",
                        help="CPU smoke run: reference kernels on tiny shapes, times only (no bandwidth figures)")
    parser.add_argument("--batch", type=int, default=64, help="decode sequences")
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 2048, 4096], help="decode context lengths")
    parser.add_argument("--heads", default="32/8,32/32", help="q/kv head pairs, comma separated")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=DEFAULT_BLOCK_SIZE, help="tokens per KV block")
    parser.add_argument("--prefill", default="8x1024", help="SEQSxTOKENS of the prefill rows")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="bfloat16")
    parser.add_argument("--sweep", action="store_true", help="also time alternative tile configs, report the best")
    parser.add_argument("--only", choices=("attention", "gemm"), help="run only the attention + KV rows or the matmul rows")
    parser.add_argument("--gemm-rows", default="1,16,128",
                        help="rows (sequences) of the decode-step matmul rows, comma separated ('' for none)")
    parser.add_argument("--gemm-shape", default="4096,11008,4096",
                        help="HIDDEN,INTERMEDIATE,KV_DIM of those matmuls (default: Llama-2-7B)")
    args = parser.parse_args(argv)

    gpu = not args.tiny
    if gpu and not torch.cuda.is_available():
        parser.error("no CUDA device: use --tiny for the CPU smoke run")
    if args.tiny:
        torch.set_num_threads(1)  # tiny shapes: a second thread only waits (and on a loaded box, much longer)
        args.batch, args.contexts, args.heads, args.head_dim, args.prefill = 2, [64], "4/2", 64, "2x32"
        args.gemm_rows, args.gemm_shape = "1,4", "64,128,32"
        args.dtype = "float32"
    heads = [tuple(int(x) for x in pair.split("/")) for pair in args.heads.split(",")]
    prefill_seqs, prefill_len = (int(x) for x in args.prefill.split("x"))
    torch.manual_seed(0)
    timer = Timer(gpu)
    facts = {"command": "hf-paged bench kernels " + " ".join(argv if argv is not None else sys.argv[1:]),
             "torch": torch.__version__, "host": platform.node()}
    if gpu:
        import triton

        warm_up_gpu()
        timer.copy_gbps = measure_copy_bandwidth(timer)
        props = torch.cuda.get_device_properties(0)
        facts.update(device=props.name, sms=props.multi_processor_count, triton=triton.__version__,
                     copy_bandwidth_gbps=timer.copy_gbps)
        print(f"{props.name}: device-to-device copy {timer.copy_gbps:.0f} GB/s (read + write)")
    else:
        facts.update(device="cpu (reference kernels only)")

    rows: list[Row] = []
    if args.only != "gemm":
        bench_attention_rows(timer, heads, prefill_seqs, prefill_len, args, rows)
    hidden, intermediate, kv_dim = (int(x) for x in args.gemm_shape.split(","))
    for m in [int(x) for x in args.gemm_rows.split(",") if x] if args.only != "attention" else []:
        bench_gemm(timer, m, hidden, intermediate, kv_dim, args, rows)

    table = format_table(rows)
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({**facts, "rows": [asdict(r) for r in rows]}, indent=2))
    return 0


def bench_attention_rows(timer, heads, prefill_seqs, prefill_len, args, rows):
    for hq, hkv in heads:
        for ctx in args.contexts:
            bench_attention(timer, "decode", [1] * args.batch, [ctx] * args.batch, hq, hkv, args, rows, args.sweep)
        q_lens = [prefill_len] * prefill_seqs
        bench_attention(timer, "prefill", q_lens, q_lens, hq, hkv, args, rows, args.sweep)
        # Chunked prefill / prefix-cache hit: the last half of each prompt over its cached first half (no sdpa twin).
        half = [prefill_len // 2] * prefill_seqs
        bench_attention(timer, "prefill+prefix", half, q_lens, hq, hkv, args, rows, sweep=False)
        # A continuous-batching step: the decodes of a running batch and one new prompt in one launch.
        ctx = args.contexts[0]
        bench_attention(timer, "mixed", [1] * args.batch + [prefill_len], [ctx] * args.batch + [prefill_len], hq,
                        hkv, args, rows, sweep=False)
    hkv = heads[0][1]
    bench_write_kv(timer, args.batch, hkv, args, rows)
    bench_write_kv(timer, prefill_seqs * prefill_len, hkv, args, rows)
    bench_copy_blocks(timer, 64 if args.tiny else 2048, hkv, args, rows)


if __name__ == "__main__":
    sys.exit(main())
