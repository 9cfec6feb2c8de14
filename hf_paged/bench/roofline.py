"""The bench's HBM roofline: model and device facts, and an ideal continuous-batching schedule over them.

The formula, and what it leaves out, is in docs/benchmarks.md ("The HBM roofline").
"""

from __future__ import annotations

import platform
from collections import deque
from dataclasses import dataclass

import torch

GPU_MEMORY_UTILIZATION = 0.9  # the KV capacity on a GPU, as hf_paged.LLM's default pool


@dataclass(slots=True)
class ModelFacts:
    num_params: int
    matmul_params: int  # weights used as matmuls (2 FLOPs per token each): all but an untied input embedding
    weight_bytes_per_step: int  # every matmul weight read once (an untied input embedding is only gathered)
    kv_bytes_per_token: int  # K and V of one token over all layers

    @classmethod
    def of(cls, model) -> ModelFacts:
        config = model.config.get_text_config(decoder=True)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        num_kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        params = sum(p.numel() for p in model.parameters())
        embed = model.get_input_embeddings().weight
        untied = embed is not model.get_output_embeddings().weight
        matmul_params = params - (embed.numel() if untied else 0)
        itemsize = embed.element_size()
        return cls(params, matmul_params, matmul_params * itemsize, 2 * config.num_hidden_layers * num_kv_heads * head_dim * itemsize)


def measure_device(device: torch.device, dtype: torch.dtype) -> dict:
    """The device's copy bandwidth (bytes read + written per second) and dense matmul rate, measured here."""
    from hf_paged.bench.kernels import Timer, warm_up_gpu

    gpu = device.type == "cuda"
    timer = Timer(gpu)
    if gpu:
        warm_up_gpu()
    nbytes = (2 << 30) if gpu else (128 << 20)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    copy_gbps = 2 * nbytes / timer.ms(lambda: dst.copy_(src)) / 1e6
    del src, dst
    n = 8192 if gpu else 1024
    a = torch.randn(n, n, dtype=dtype, device=device)
    matmul_tflops = 2 * n**3 / timer.ms(lambda: a @ a) / 1e9
    facts = {"type": device.type, "copy_gbps": copy_gbps, "matmul_tflops": matmul_tflops}
    if gpu:
        props = torch.cuda.get_device_properties(device)
        facts.update(name=props.name, memory_bytes=props.total_memory)
    else:
        facts.update(name=platform.processor() or platform.machine(), threads=torch.get_num_threads())
    return facts


def decode_step_seconds(facts: ModelFacts, batch: float, context_tokens: float, bandwidth: float,
                        flops: float) -> float:
    """What the roofline charges a decode step: the weights and the KV held over the bandwidth (bytes/s), or the
    batch's matmuls at the matmul rate (FLOP/s), whichever is longer."""
    return max((facts.weight_bytes_per_step + facts.kv_bytes_per_token * context_tokens) / bandwidth,
               2 * facts.matmul_params * batch / flops)


def step_roofline(rows: list[dict], facts: ModelFacts, copy_gbps: float, matmul_tflops: float) -> list[dict]:
    """`rows` of decode steps by batch size (bench/systems.py `decode_by_batch`) with what the roofline charges such
    a step (`decode_step_seconds` at the bucket's mean batch and KV), its fraction of the measured step, and the
    bucket's share of all decode time."""
    total = sum(row["total_s"] for row in rows) or 1.0
    out = []
    for row in rows:
        ideal_ms = 1e3 * decode_step_seconds(facts, row["mean_batch"], row["mean_kv_tokens"], copy_gbps * 1e9,
                                             matmul_tflops * 1e12)
        out.append({**row, "roofline_ms": ideal_ms, "vs_roofline": ideal_ms / row["mean_ms"],
                    "share_of_decode": row["total_s"] / total})
    return out


def roofline(lengths: list[tuple[int, int]], facts: ModelFacts, kv_capacity_tokens: int, copy_gbps: float,
             matmul_tflops: float) -> dict:
    """An ideal continuous-batching schedule bound by HBM bandwidth (formula in docs/benchmarks.md).

    FCFS admission while prompt + output of every running request fit the KV capacity (no waste); each prefill
    costs 2 * params * prompt_len FLOPs at the matmul rate and yields the first token; each decode step costs
    max((weights + KV of the running batch) / bandwidth, 2 * params * batch / matmul rate).
    """
    bandwidth, flops = copy_gbps * 1e9, matmul_tflops * 1e12
    params = facts.matmul_params
    waiting, running = deque(lengths), []  # running: [context tokens, tokens left to decode, tokens reserved]
    free, prefill_s, decode_s, steps, max_batch = kv_capacity_tokens, 0.0, 0.0, 0, 0
    while waiting or running:
        while waiting and sum(waiting[0]) <= free:
            prompt_len, output_len = waiting.popleft()
            prefill_s += 2 * params * prompt_len / flops  # NOTE: the prefill yields the first output token
            if output_len > 1:
                free -= prompt_len + output_len
                running.append([prompt_len + 1, output_len - 1, prompt_len + output_len])
        if not running:
            if waiting:
                raise ValueError(f"a request of {sum(waiting[0])} tokens exceeds the KV capacity ({kv_capacity_tokens})")
            break
        decode_s += decode_step_seconds(facts, len(running), sum(r[0] for r in running), bandwidth, flops)
        steps, max_batch = steps + 1, max(max_batch, len(running))
        for r in running:
            r[0], r[1] = r[0] + 1, r[1] - 1
        free += sum(r[2] for r in running if r[1] == 0)
        running = [r for r in running if r[1] > 0]
    elapsed = prefill_s + decode_s
    out_tokens = sum(o for _, o in lengths)
    return {"elapsed_s": elapsed, "prefill_s": prefill_s, "decode_s": decode_s, "decode_steps": steps,
            "max_batch": max_batch, "kv_capacity_tokens": kv_capacity_tokens,
            "requests_per_s": len(lengths) / elapsed, "output_tok_per_s": out_tokens / elapsed,
            "total_tok_per_s": (out_tokens + sum(p for p, _ in lengths)) / elapsed}


def kv_capacity_tokens(model, facts: ModelFacts, device: dict, kv_cache_memory: int | None) -> int:
    """KV tokens the roofline may hold: the given budget, or 90% of the GPU less the weights."""
    if kv_cache_memory is None:
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        kv_cache_memory = GPU_MEMORY_UTILIZATION * device["memory_bytes"] - weights
    return int(kv_cache_memory // facts.kv_bytes_per_token)
