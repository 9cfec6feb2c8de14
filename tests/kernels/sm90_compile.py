"""Compile the Triton kernels for Hopper (sm_90) and print what the compiler reports, as JSON.

Run by tests/kernels/test_compile_sm90.py in a fresh interpreter: under TRITON_INTERPRET=1 (the CPU tests) the
kernels are interpreted functions that the compiler cannot take.
"""

import json
import os
import re
import subprocess
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from hf_paged.kernels import kv_write, paged_decode, paged_prefill, tuning

HOPPER = GPUTarget("cuda", 90, 32)
POINTERS = {"out": "*bf16", "query": "*bf16", "k_cache": "*bf16", "v_cache": "*bf16", "key": "*bf16",
            "value": "*bf16", "key_cache": "*bf16", "value_cache": "*bf16", "part_acc": "*fp32", "part_ml": "*fp32",
            "new_k": "*bf16", "new_v": "*bf16", "key_rows": "*bf16", "value_rows": "*bf16", "counters": "*i32",
            "block_tables": "*i32", "seq_lens": "*i32", "cu_seqlens_q": "*i32", "slot_mapping": "*i64",
            "sinks": "*fp32", "qk_scale": "fp32", "softcap_scale": "fp32"}
COMMON = dict(HEAD_DIM=128, HEAD_PAD=128, BLOCK_SIZE=16, SLIDING=False, SOFTCAP=False, DOT_PRECISION="tf32",
              INTERPRET=False, PDL=False, SINKS=False)


def aligned_args(kernel, signature: dict) -> dict:
    """The divisibility-16 hints a launch gives: triton specialises every pointer and int argument that is a multiple
    of 16 (unless do_not_specialize), and the pipeliner turns loads into async copies only where it can prove 4+
    contiguous bytes. Without the hints an offline compile is not the kernel the device runs (no cp.async, more
    registers). On the device the pointers are 16-byte aligned and every stride is a multiple of 16 elements
    (head_dim 128); the block-table width and the runtime scalars (window, num_seqs) are not."""
    unaligned = set(getattr(kernel, "do_not_specialize", ())) | {"window", "num_seqs"}
    names = kernel.arg_names
    return {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
            if signature[n] != "constexpr" and n not in unaligned
            and (signature[n].startswith("*") or n.startswith("stride_"))}


def compile_for_hopper(kernel, constants: dict, num_warps: int, num_stages: int, types: dict | None = None) -> dict:
    names = kernel.arg_names
    missing = [p.name for p in kernel.params if p.is_constexpr and p.name not in constants]
    if missing:  # it would compile as a runtime i32: not the kernel a launch compiles
        raise ValueError(f"{kernel.__name__}: no value for the constexpr parameters {missing}")
    signature = {n: "constexpr" if n in constants else {**POINTERS, **(types or {})}.get(n, "i32") for n in names}
    source = ASTSource(fn=kernel, signature=signature, constexprs={(names.index(k),): v for k, v in constants.items()},
                       attrs=aligned_args(kernel, signature))
    options = {"num_warps": num_warps, "num_stages": num_stages, "launch_pdl": constants.get("PDL", False)}
    compiled = triton.compile(source, target=HOPPER, options=options)
    return {"shared": compiled.metadata.shared, "wgmma": "wgmma" in compiled.asm["ptx"],
            "tma": "cp.async.bulk.tensor" in compiled.asm["ptx"],
            "async_copies": "cp.async.cg" in compiled.asm["ptx"] or "cp.async.ca" in compiled.asm["ptx"],
            # copy groups still in flight when a loop waits for its tile: 0 means no copy overlaps compute
            "copies_ahead": max(map(int, re.findall(r"ttg\.async_wait [^\n]*num = (\d+)", compiled.asm["ttgir"])),
                                default=0),
            "atomics": sorted(set(re.findall(r"\batom\.[\w.]+", compiled.asm["ptx"]))),
            "l2_loads": "ld.global.cg" in compiled.asm["ptx"] or "ld.global.L1::no_allocate" in compiled.asm["ptx"],
            "barriers": compiled.asm["ptx"].count("bar.sync"),
            "pdl": [op for op in ("griddepcontrol.wait", "griddepcontrol.launch_dependents")
                    if op in compiled.asm["ptx"]],
            **registers(compiled.asm["ptx"])}


def registers(ptx: str) -> dict:
    """Registers per thread and bytes spilled, from triton's bundled ptxas (-v); {} where it is missing."""
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas):
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        info = subprocess.run([ptxas, "-v", "--gpu-name", "sm_90a", path, "-o", os.devnull], capture_output=True,
                              text=True).stderr
    regs = re.search(r"Used (\d+) registers", info)
    spills = re.search(r"(\d+) bytes spill stores", info)
    return {"registers": int(regs.group(1)), "spill_bytes": int(spills.group(1))} if regs and spills else {}


def main() -> dict:
    report = {}
    for group in (4, 1):  # GQA 4 (llama3-8b), MHA (llama2-7b)
        # K/V all through the block tables; the step's own K/V apart, by pointer and through TMA, and stored into
        # its slots as the engine's forwards do (_write), also launched early (_pdl) or storing after the attention
        # (_last, PrefillConfig.store_last); each with its tuned config; fresh prompts (_fresh: no block-table loops
        # compiled; storing in the tuned config's order, after the attention since 2026-12-07)
        for suffix, new_kv, write, pdl in (("", 0, False, False), ("_own_kv", 1, False, False),
                                           ("_own_kv_tma", 2, False, False), ("_own_kv_tma_write", 2, True, False),
                                           ("_own_kv_tma_write_pdl", 2, True, True),
                                           ("_own_kv_tma_write_last", 2, True, False),
                                           ("_own_kv_tma_write_fresh", 2, True, False),
                                           ("_own_kv_tma_write_sinks", 2, True, False)):
            cfg = tuning.default_prefill_config(group, 128, torch.device("cuda"), own_kv=new_kv > 0)  # no GPU touched
            block_q = cfg.block_m // group
            types = {"new_k": f"tensordesc<bf16[{cfg.block_n}, 1, 128]>", "new_v": f"tensordesc<bf16[{cfg.block_n}, 1, "
                     "128]>"} if new_kv == 2 else {}
            report[f"prefill_group{group}{suffix}"] = compile_for_hopper(
                paged_prefill._prefill_kernel, dict(COMMON, GROUP=group, BLOCK_M=cfg.block_m, BLOCK_Q=block_q,
                                                    BLOCK_N=cfg.block_n, NEW_KV=new_kv, WRITE=write,
                                                    WRITE_Q=min(16, triton.next_power_of_2(block_q)), PDL=pdl,
                                                    PREFIX=not suffix.endswith("_fresh"),
                                                    SINKS=suffix.endswith("_sinks"),
                                                    STORE_LAST=suffix.endswith("_last") or (
                                                        suffix.endswith("_fresh") and cfg.store_last)),
                cfg.num_warps, cfg.num_stages, types)
    # one split; four merged by a second launch; four merged by the last split, with the step's own K/V stored;
    # also launched early (_pdl), or splitting only sequences of 4+ tiles a split (_min4, min_split_tiles), or
    # with the grid KV heads first (_heads, heads_fastest)
    for name, splits, special, fused, pdl in (("decode_splits1", 1, False, False, False),
                                              ("decode_splits4", 4, True, False, False),
                                              ("decode_splits4_fused_write", 4, False, True, False),
                                              ("decode_splits4_fused_write_min4", 4, False, True, False),
                                              ("decode_splits1_fused_write_heads", 1, False, True, False),
                                              ("decode_splits2_fused_write_pdl", 2, False, True, True),
                                              ("decode_splits4_fused_write_sinks", 4, False, True, False)):
        report[name] = compile_for_hopper(
            paged_decode._decode_kernel, dict(COMMON, GROUP=4, BLOCK_H=16, BLOCK_N=64, NUM_SPLITS=splits,
                                              MIN_SPLIT_TILES=4 if name.endswith("_min4") else 1,
                                              SLIDING=special, SOFTCAP=special, NEW_KV=fused, WRITE=fused,
                                              FUSED_REDUCE=fused, PDL=pdl,
                                              HEADS_FASTEST=name.endswith("_heads"),
                                              SINKS=name.endswith("_sinks")), 4, 3)
    for name, pdl in (("reduce", False), ("reduce_pdl", True), ("reduce_min4", False), ("reduce_sinks", False)):
        report[name] = compile_for_hopper(paged_decode._reduce_kernel, dict(
            NUM_SPLITS=4, SPLITS_PAD=4, HEAD_DIM=128, HEAD_PAD=128, BLOCK_N=64, SLIDING=False, NEW_KV=True,
            MIN_SPLIT_TILES=4 if name.endswith("_min4") else 1, PDL=pdl, SINKS=name.endswith("_sinks")), 4, 1)
    report["write_kv"] = compile_for_hopper(kv_write._write_kv_kernel, dict(NUM_HEADS=8, HEAD_DIM=128, BLOCK_H=8,
                                                                           HEAD_PAD=128, BLOCK_SIZE=16), 4, 1)
    return report


if __name__ == "__main__":
    print(json.dumps(main()))
