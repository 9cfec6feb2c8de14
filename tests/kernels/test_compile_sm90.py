"""The Triton kernels compile for Hopper (sm_90) on any machine, GPU or not.

The CPU interpreter runs the kernels' arithmetic but not the compiler: a type error in a loop, a layout that does
not fit shared memory, or a dot that misses the tensor cores only shows when compiling. tests/kernels/
sm90_compile.py compiles them for GPUTarget("cuda", 90) with the shapes the device runs (bf16, head_dim 128,
block_size 16), in a fresh interpreter without TRITON_INTERPRET.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

from hf_paged.kernels.attention_tile import PIPELINE_DECODE, PIPELINE_PREFILL

SHARED_MEMORY = 227 * 1024  # per block on an H100 / H200


def test_kernels_compile_for_hopper():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).with_name("sm90_compile.py")
    done = subprocess.run([sys.executable, "-P", str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    prefill = [f"prefill_group{g}{suffix}" for g in (4, 1)
               for suffix in ("", "_own_kv", "_own_kv_tma", "_own_kv_tma_write", "_own_kv_tma_write_pdl",
                              "_own_kv_tma_write_last", "_own_kv_tma_write_fresh", "_own_kv_tma_write_sinks")]
    decode = ["decode_splits1", "decode_splits4", "decode_splits4_fused_write", "decode_splits4_fused_write_min4",
              "decode_splits1_fused_write_heads", "decode_splits2_fused_write_pdl", "decode_splits4_fused_write_sinks"]
    assert set(report) == {*prefill, *decode, "reduce", "reduce_pdl", "reduce_min4", "reduce_sinks", "write_kv"}
    # HF_PAGED_PDL: programmatic dependent launch waits for the kernel before and lets the next one start
    for name, kernel in report.items():
        expected = ["griddepcontrol.wait", "griddepcontrol.launch_dependents"] if name.endswith("_pdl") else []
        assert kernel["pdl"] == expected, (name, kernel)
    for name, kernel in report.items():
        assert kernel["shared"] <= SHARED_MEMORY, (name, kernel)
    for name in prefill:
        assert report[name]["wgmma"], name  # Hopper's tensor-core MMA
        assert report[name]["tma"] == ("_tma" in name), name  # the descriptors' loads are bulk tensor copies
    # the last split's merge: an acquire-release atomic on the arrival counter, then the partials read from L2
    fused = report["decode_splits4_fused_write"]
    assert any(".acq_rel." in atom and ".add." in atom for atom in fused["atomics"]) and fused["l2_loads"], fused
    assert not report["decode_splits4"]["atomics"], report["decode_splits4"]
    # attention sinks (gpt-oss) cost the engine's kernels nothing but their normalisation: the same shared memory
    # and, within a few, the same registers as without
    for name, plain in (("prefill_group1_own_kv_tma_write_sinks", "prefill_group1_own_kv_tma_write"),
                        ("decode_splits4_fused_write_sinks", "decode_splits4_fused_write"),
                        ("reduce_sinks", "reduce")):
        assert report[name]["shared"] == report[plain]["shared"], (name, report[name], report[plain])
        if "registers" in report[plain]:
            assert report[name]["registers"] <= report[plain]["registers"] + 8, (name, report[name], report[plain])
    # software pipelining: K/V read by pointer (through the block tables, or the step's own rows without TMA) are
    # async copies into shared memory (fresh prompts with TMA read no K/V by pointer); pipelined
    # (HF_PAGED_KV_PIPELINE) they stay num_stages - 1 tiles ahead of the tile being computed (3 stages: 2 tiles, K
    # and V apart: 2-3 copy groups still in flight at a wait), block tables included; the decode's default schedule
    # waits for each tile's copies in its own iteration
    for name, kernel in report.items():
        if name.startswith("decode") or (name.startswith("prefill") and not name.endswith("_fresh")):
            assert kernel["async_copies"], (name, kernel)
            if name.startswith("decode"):  # K/V through the block table only
                assert (kernel["copies_ahead"] >= 2) == bool(PIPELINE_DECODE), (name, kernel)
            elif PIPELINE_PREFILL:  # the step's own rows by pointer run ahead on either schedule
                assert kernel["copies_ahead"] >= 2, (name, kernel)
    # the engine's paths hold their tiles in registers (ptxas -v, where triton bundles it)
    for name, kernel in report.items():
        if "spill_bytes" in kernel and (name.startswith("decode") or "_own_kv" in name):
            assert kernel["spill_bytes"] == 0, (name, kernel)
    # fresh prompts: without the block-table loops the engine's prefill kernel holds no more than with them (both
    # storing the step's K/V after the attention, the tuned order)
    for group in (4, 1):
        fresh = report[f"prefill_group{group}_own_kv_tma_write_fresh"]
        full = report[f"prefill_group{group}_own_kv_tma_write_last"]
        if "spill_bytes" in full:
            assert fresh["spill_bytes"] <= full["spill_bytes"] and fresh["registers"] <= full["registers"], (fresh, full)
