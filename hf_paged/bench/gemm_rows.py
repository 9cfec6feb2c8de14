"""`bench kernels` rows of the skinny matmul (kernels/skinny_matmul.py) against cuBLAS, for a decode step's
projections at 1-16 rows: each as the engine runs it (q/k/v and gate/up over their concatenated weights), the
skinny kernel at its default tile and, with `--sweep`, at every tile and split of `skinny_configs`."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hf_paged.kernels.skinny_matmul import MAX_ROWS, skinny_linear
from hf_paged.kernels.tuning import SkinnyConfig, default_skinny_config

# (block_n, block_k, num_warps, num_stages): each stage holds block_n x block_k weights (at most 64 KiB)
_TILES = ((16, 256, 4, 4), (16, 512, 4, 3), (32, 128, 4, 4), (32, 256, 4, 4), (32, 512, 4, 2), (64, 128, 4, 4),
          (64, 128, 4, 6), (64, 256, 4, 3), (128, 64, 4, 4), (128, 128, 8, 3))


def skinny_configs(n: int, k: int, sms: int) -> list[SkinnyConfig]:
    """Every tile of _TILES at each split of K that keeps the programs between half the SMs and eight waves, then
    every tile as stream-K over one and two programs an SM."""
    configs = []
    for block_n, block_k, warps, stages in _TILES:
        strips = -(-n // block_n)
        for split in (1, 2, 4, 8, 16):
            if split * block_k <= k and sms // 2 <= strips * split <= 8 * sms:
                configs.append(SkinnyConfig(block_n, block_k, split, warps, stages))
    return configs + [SkinnyConfig(block_n, block_k, 1, warps, stages, persistent=per)
                      for per in (1, 2) for block_n, block_k, warps, stages in _TILES]


def projections(hidden: int, intermediate: int, kv_dim: int, vocab: int) -> dict[str, tuple[int, int]]:
    """A Llama decoder's matmuls as the engine runs them: name -> (N, K) of the weight."""
    return {"qkv": (hidden + 2 * kv_dim, hidden), "o": (hidden, hidden), "gate_up": (2 * intermediate, hidden),
            "down": (hidden, intermediate), "lm_head": (vocab, hidden)}


def bench_skinny(timer, m, shapes, dtype, sweep, rows, row_type):
    """Rows `matmul[NAME] skinny` (and `... skinny best of sweep`) at `m` rows against cuBLAS on the same weight;
    each row's detail holds the kernel's largest error against cuBLAS (a wrong tile is never reported fast)."""
    if m > MAX_ROWS:
        return
    device = timer.device
    sms = torch.cuda.get_device_properties(0).multi_processor_count if timer.gpu else 4
    for name, (n, k) in shapes.items():
        x = torch.randn(m, k, dtype=dtype, device=device)
        weight = torch.randn(n, k, dtype=dtype, device=device) / k**0.5
        nbytes = (weight.numel() + (n + k) * m) * x.element_size()
        shape = f"M={m} {k}->{n}"
        ref = F.linear(x, weight)
        cublas_ms = timer.ms(lambda: F.linear(x, weight))
        rows.append(row_type(f"matmul[{name}] cuBLAS", shape, cublas_ms, *timer.frac(nbytes, cublas_ms)))

        def timed(cfg):
            err = (skinny_linear(x, weight, config=cfg).float() - ref.float()).abs().max().item()
            return timer.ms(lambda: skinny_linear(x, weight, config=cfg), quick=cfg is not None), err

        default = default_skinny_config(m, n, k, torch.device(device))
        ms, err = timed(None)
        rows.append(row_type(f"matmul[{name}] skinny", shape, ms, *timer.frac(nbytes, ms), baseline="cuBLAS",
                             baseline_ms=cublas_ms, vs_baseline=ms / cublas_ms, config=repr(default),
                             detail={"max_abs_err": err}))
        if sweep and timer.gpu:
            times, errs = {}, {}
            for cfg in skinny_configs(n, k, sms):
                try:
                    times[repr(cfg)], errs[repr(cfg)] = timed(cfg)
                except Exception as exc:  # noqa: BLE001 - a tile the device cannot run is left out
                    print(f"  skip {cfg}: {type(exc).__name__}: {str(exc)[:120]}")
            if times:
                best = min(times, key=times.get)
                rows.append(row_type(f"matmul[{name}] skinny best of sweep", shape, times[best],
                                     *timer.frac(nbytes, times[best]), baseline="cuBLAS", baseline_ms=cublas_ms,
                                     vs_baseline=times[best] / cublas_ms, config=best,
                                     detail={"sweep_ms": dict(sorted(times.items(), key=lambda kv: kv[1])),
                                             "max_abs_err": errs}))
        del x, weight, ref
