"""The attention rows of `hf-paged bench kernels`: decode, prefill, prefill over a cached prefix, mixed steps and
a decode step's layer as the engine runs it, each next to its baseline (sdpa on contiguous K/V, or the same work
as separate launches); `--sweep` adds the tile-config sweeps."""

from __future__ import annotations

import dataclasses
import functools
import sys

import torch
import torch.nn.functional as F

from hf_paged.bench.kernels import _DTYPES, Row
from hf_paged.bench.workloads import serving_lengths
from hf_paged.kernels import reference
from hf_paged.kernels.ops import decode_heads_first, decode_longest_first


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
        for batch in [int(x) for x in args.step_batches.split(",") if x] if timer.gpu else []:
            bench_decode_step(timer, batch, args.step_context, hq, hkv, args, rows, args.sweep)
            if batch > 1:  # the same mean context, spread as a serving batch's is (a few long, most short)
                bench_decode_step(timer, batch, args.step_context, hq, hkv, args, rows, args.sweep, ragged=True)


def bench_attention(timer, kind, q_lens, seq_lens, hq, hkv, args, rows, sweep):
    """Rows for one attention shape. Batches with prompts get two rows on a GPU: K/V read through the block tables
    only (the engine's way where there is cached context), and `own K/V, stored`: the step's own K/V passed apart
    (only the earlier context is gathered) and stored into its slots by the same launch, the engine's way for
    fresh prompts (the `prefill` rows, marked fresh). Fresh prompts also get `own K/V`: the same launch without the
    store, sdpa's work exactly (attention over contiguous K/V); and the stored row's detail times sdpa followed by
    the K/V store (`write_kv`), the same total work as that row."""
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
    # (own K/V passed apart, stored by the same launch); own K/V unstored only for fresh prompts (sdpa's work)
    variants = [(False, False)]
    if timer.gpu and max_q > 1:
        variants += [(True, False)] * (kind == "prefill") + [(True, True)]
    for own_kv, stored in variants:
        new_kv = {}
        if own_kv:
            tokens = inputs["query"].shape[0]
            new_kv = {name: torch.randn(tokens, hkv, args.head_dim, dtype=dtype, device=device)  # (T, Hkv, D)
                      for name in ("key", "value")}
            if stored:  # into the step's slots
                new_kv["slot_mapping"] = new_token_slots(inputs["block_tables"], q_lens, seq_lens, args.block_size)
            new_kv["fresh"] = q_lens == seq_lens  # prompts without cached context: no block-table reads
        if timer.gpu:
            from hf_paged.kernels.paged_attention import paged_attention

            def run(cfg=None, new_kv=new_kv):
                return paged_attention(**inputs, **new_kv, scale=scale, max_seqlen_q=max_q, config=cfg)

            name = f"paged_attention[{kind}]" + (" own K/V" if own_kv else "") + (", stored" if stored else "")
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
            if stored:
                row.detail = {"sdpa_then_store_ms": timer.ms(_sdpa_then_store(baseline, inputs, new_kv))}
        rows.append(row)
        if own_kv and not stored:
            continue  # a measurement of sdpa's work, not a path the engine takes: no sweep
        if sweep and timer.gpu and kind in ("decode", "prefill") and kind in args.sweep_kinds:
            times = sweep_configs(timer, run, decode_configs() if max_q == 1 else prefill_configs())
            cfg, best_ms = next(iter(times.items()))
            rows.append(Row(name + " best of sweep", shape, best_ms, *timer.frac(nbytes, best_ms),
                            tflops=flops / best_ms / 1e9, config=cfg, detail={"sweep_ms": times},
                            baseline=row.baseline, baseline_ms=row.baseline_ms, vs_baseline=(
                                best_ms / row.baseline_ms if row.baseline_ms else None)))
    del inputs

def bench_decode_step(timer, batch, ctx, hq, hkv, args, rows, sweep=False, ragged=False):
    """One layer's attention in a decode step as the engine's graphs run it: the step's K/V stored and attended in
    one launch (two where a second merges the splits), against `write_kv`, then the decode kernel, then the
    reduction kernel, apart. Each is timed as 32 layers replayed from one CUDA graph, per layer: at small batches
    the launches, not the bytes, set the time. `ragged`: contexts of mean `ctx` spread as `serving_lengths`, longest
    first unless `HF_PAGED_DECODE_ORDER` says otherwise (the engine's order; before 2026-12-07 in random order).
    `sweep`: also every split count with either merge, and splits only for the long sequences
    (`min_split_tiles`)."""
    from hf_paged.kernels.kv_write import write_kv
    from hf_paged.kernels.paged_attention import paged_attention
    from hf_paged.kernels.tuning import default_decode_config

    dtype, device, d = _DTYPES[args.dtype], timer.device, args.head_dim
    seq_lens = serving_lengths(batch, ctx) if ragged else [ctx] * batch
    if decode_longest_first():  # the batch as the engine launches it (HF_PAGED_DECODE_ORDER, the default)
        seq_lens.sort(reverse=True)
    inputs = attention_inputs([1] * batch, seq_lens, hq, hkv, d, args.block_size, dtype, device)
    key, value = (torch.randn(batch, hkv, d, dtype=dtype, device=device) for _ in range(2))  # (B, Hkv, D)
    slots = new_token_slots(inputs["block_tables"], [1] * batch, seq_lens, args.block_size)
    scale = d**-0.5
    config = default_decode_config(batch, hkv, d, torch.device(device))
    apart_config = dataclasses.replace(config, fused_reduce=False)

    def fused(cfg=config):
        return paged_attention(**inputs, scale=scale, max_seqlen_q=1, key=key, value=value, slot_mapping=slots,
                               config=cfg)

    def apart():
        write_kv(key, value, inputs["key_cache"], inputs["value_cache"], slots)
        return paged_attention(**inputs, scale=scale, max_seqlen_q=1, config=apart_config)

    layers = 32
    ms = timer.ms(_graphed(fused, layers)) / layers
    base_ms = timer.ms(_graphed(apart, layers)) / layers
    nbytes = attention_bytes(inputs, [1] * batch, seq_lens) + 2 * key.numel() * key.element_size()
    context = f"ctx~{ctx} ragged, max {max(seq_lens)}" if ragged else f"ctx{ctx}"
    shape = f"{batch}x(q1,{context}) {hq}/{hkv}h d{d} bs{args.block_size}"
    rows.append(Row("decode layer: write+attend, 1 launch", shape, ms, *timer.frac(nbytes, ms), config=repr(config),
                    baseline="write_kv + decode" + (" + reduce" if config.num_splits > 1 else "") + ", apart",
                    baseline_ms=base_ms, baseline_frac_copy=timer.frac(nbytes, base_ms)[1],
                    vs_baseline=ms / base_ms))
    if sweep:
        configs = [dataclasses.replace(config, num_splits=s, fused_reduce=f) for s in (1, 2, 4, 8, 16)
                   for f in ((True,) if s == 1 else (True, False))]
        configs += [dataclasses.replace(config, num_splits=s, fused_reduce=s <= 2, min_split_tiles=m)
                    for s in (2, 4, 8) for m in (2, 4, 8)]
        times = {repr(c): timer.ms(_graphed(functools.partial(fused, c), layers)) / layers for c in configs}
        best, best_ms = min(times.items(), key=lambda kv: kv[1])
        rows.append(Row("decode layer: write+attend best of sweep", shape, best_ms, *timer.frac(nbytes, best_ms),
                        config=best, detail={"sweep_ms": dict(sorted(times.items(), key=lambda kv: kv[1]))},
                        baseline=rows[-1].baseline, baseline_ms=base_ms, vs_baseline=best_ms / base_ms))

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

def new_token_slots(block_tables, q_lens, seq_lens, block_size) -> torch.Tensor:
    """The slots of each sequence's last q_len positions, packed like the queries (T,) int64."""
    tables = block_tables.tolist()
    slots = [tables[s][p // block_size] * block_size + p % block_size
             for s, (q, n) in enumerate(zip(q_lens, seq_lens)) for p in range(n - q, n)]
    return torch.tensor(slots, dtype=torch.long, device=block_tables.device)


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

    tiles = [(32, 4, 3), (32, 4, 4), (64, 4, 2), (64, 4, 3), (64, 4, 4), (64, 8, 3), (128, 4, 2), (128, 8, 3)]
    heads_fastest = decode_heads_first()  # the grid the defaults launch
    return [DecodeConfig(n, s, w, st, heads_fastest=heads_fastest) for s in (1, 2, 4) for n, w, st in tiles]

def prefill_configs():
    from hf_paged.kernels.tuning import PrefillConfig

    return [PrefillConfig(*c) for c in [
        (128, 32, 4, 2), (128, 32, 4, 3), (128, 32, 4, 4), (128, 32, 8, 3), (128, 64, 4, 2), (128, 64, 4, 3),
        (128, 64, 8, 2), (128, 64, 8, 3), (128, 128, 8, 2), (64, 32, 4, 3), (64, 32, 4, 4), (64, 64, 4, 2),
        (64, 64, 4, 3), (64, 64, 4, 4), (256, 32, 8, 3), (256, 64, 8, 2)]] + [  # own K/V by pointer instead of TMA
        PrefillConfig(*c, tma=False) for c in [(128, 32, 4, 3), (64, 32, 4, 3), (128, 32, 8, 3), (128, 64, 8, 3)]] + [
        # rows that store the step's own K/V: after the attention (the own-K/V default's order since 2026-12-07), where
        # the configs above store before it (the same as the above elsewhere)
        # two warpgroups (8 warps, 128 rows) too: offline for sm_90 the widest hold 182-250 registers, one block an SM
        PrefillConfig(*c, store_last=True) for c in [(64, 64, 4, 2), (64, 64, 4, 3), (64, 64, 4, 4), (64, 32, 4, 3),
                                                     (64, 32, 4, 4), (128, 64, 4, 2), (128, 32, 8, 4), (128, 64, 8, 2),
                                                     (128, 64, 8, 3), (128, 128, 8, 2)]]

def sweep_configs(timer, run, configs) -> dict[str, float]:
    """ms of each config that runs (one that needs too much shared memory is left out), fastest first."""
    times = {}
    for cfg in configs:
        try:
            times[repr(cfg)] = timer.ms(lambda: run(cfg), quick=True)
        except Exception as exc:  # noqa: BLE001 - a config the device cannot run is just left out
            print(f"  skip {cfg}: {type(exc).__name__}: {str(exc)[:120]}", file=sys.stderr)
    return dict(sorted(times.items(), key=lambda kv: kv[1]))

def _split_launch(inputs, q_lens, scale, new_kv=None):
    """A mixed batch (decodes first, then prefills) as a decode launch and a prefill launch on its two parts."""
    from hf_paged.kernels.paged_attention import paged_attention

    nd = next((i for i, q in enumerate(q_lens) if q != 1), len(q_lens))
    cu = inputs["cu_seqlens_q"]
    decode = dict(inputs, query=inputs["query"][:nd], block_tables=inputs["block_tables"][:nd],
                  seq_lens=inputs["seq_lens"][:nd], cu_seqlens_q=cu[: nd + 1])
    prefill = dict(inputs, query=inputs["query"][nd:], block_tables=inputs["block_tables"][nd:],
                   seq_lens=inputs["seq_lens"][nd:], cu_seqlens_q=cu[nd:] - nd,
                   **{name: t[nd:] if torch.is_tensor(t) else t for name, t in (new_kv or {}).items()})
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

def _sdpa_then_store(baseline, inputs, new_kv):
    """sdpa, then the step's own K/V stored into its slots (the KV write kernel): a stored row's work as two
    launches."""
    from hf_paged.kernels.kv_write import write_kv

    def run():
        out = baseline()
        write_kv(new_kv["key"], new_kv["value"], inputs["key_cache"], inputs["value_cache"], new_kv["slot_mapping"])
        return out

    return run

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

def _graphed(fn, times: int):
    """A callable replaying `times` calls of fn captured in one CUDA graph."""
    fn()  # compiles; allocates what the launches keep (the arrival counters) outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(times):
            fn()
    return graph.replay
