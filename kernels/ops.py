"""The kernels `hf_paged.attention` calls: Triton on CUDA tensors when triton imports, torch otherwise.

Without Triton the attention runs kernels/batched.py (the whole batch in one padded gather) and the KV write and
block copy run kernels/reference.py. HF_PAGED_KERNELS overrides the choice: "reference" always uses
kernels/reference.py, "triton" always uses Triton (on CPU tensors that needs TRITON_INTERPRET=1, set before triton
is first imported), "auto" (default) decides per call from the tensors' device. `import triton` stays lazy, so
hf_paged imports without it.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

from hf_paged.kernels import batched, reference

_MODES = ("auto", "reference", "triton")


@functools.cache
def _triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def env_choice(name: str, choices: tuple[str, ...]) -> str:
    """The switch `name` of the environment, one of `choices` (any case; unset or empty: the first). Else a
    ValueError naming the variable and the choices."""
    value = os.environ.get(name, "").strip().lower() or choices[0]
    if value not in choices:
        raise ValueError(f"{name}={value!r}: expected one of {choices}")
    return value


def _mode() -> str:
    return env_choice("HF_PAGED_KERNELS", _MODES)


DECODE_ORDERS = ("longest", "heads", "sequences")


def decode_order() -> str:
    """`HF_PAGED_DECODE_ORDER`: how a decode step's programs are laid out. `longest` (the default) launches the decode
    grid KV heads first (`DecodeConfig.heads_fastest`) and has the engine run each decode step's sequences by
    context, longest first, so a ragged batch's longest programs start in the first wave and the short ones fill the
    last (+2.2% output tok/s on ShareGPT-128, H100, docs/benchmarks.md); `heads` only launches KV heads first;
    `sequences` is the layout before 2026-12-07 (sequences first, in scheduling order). Else a ValueError."""
    return env_choice("HF_PAGED_DECODE_ORDER", DECODE_ORDERS)


def decode_heads_first() -> bool:
    """Whether decode launches lay their grid out KV heads first (`DecodeConfig.heads_fastest`) by default."""
    return decode_order() != "sequences"


def decode_longest_first() -> bool:
    """Whether a decode step runs its sequences by context, longest first (the engine's order; `bench kernels`
    orders its ragged rows the same way)."""
    return decode_order() == "longest"


def _use_triton(tensor: torch.Tensor) -> bool:
    mode = _mode()
    if mode == "reference":
        return False
    if mode == "triton":
        if not _triton_importable():
            raise RuntimeError("HF_PAGED_KERNELS=triton but triton is not installed (pip install hf_paged[triton])")
        if not tensor.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(f"HF_PAGED_KERNELS=triton on {tensor.device} tensors needs TRITON_INTERPRET=1")
        return True
    return tensor.is_cuda and _triton_importable()


def paged_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
    max_seqlen_q: int | None = None,
    key: torch.Tensor | None = None,
    value: torch.Tensor | None = None,
    fresh: bool = False,
    sinks: torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Varlen causal attention over paged K/V; see `reference.paged_attention` for the layouts.

    max_seqlen_q (the longest q_len; 1 = pure decode) lets the Triton path choose its kernel without a host sync.
    key / value: the step's own K/V [num_tokens, num_kv_heads, head_dim], already in the caches; the Triton
    prefill reads the new tokens' keys there (contiguous rows) instead of through the block tables. The torch
    paths read the caches, which hold the same values. fresh: with them, no sequence has context before its new
    tokens (the Triton prefill then skips the block tables; the launcher's `fresh`). sinks: [num_q_heads] attention
    sinks (gpt-oss's `s_aux`), one more logit per head in each softmax's denominator. chunk_size: chunked attention
    (Llama4): each query sees only the keys of its own chunk (instead of a sliding window; see kernels/reference.py).
    Under torch.compile it is the opaque custom op `hf_paged::paged_attention`, so the graph does not break here.
    """
    if torch.compiler.is_compiling():
        return torch.ops.hf_paged.paged_attention(query, key_cache, value_cache, block_tables, seq_lens, cu_seqlens_q,
                                                  scale, sliding_window, softcap, max_seqlen_q, key, value, fresh,
                                                  sinks, chunk_size)
    return _paged_attention(query, key_cache, value_cache, block_tables, seq_lens, cu_seqlens_q, scale, sliding_window,
                            softcap, max_seqlen_q, key, value, fresh, sinks, chunk_size)


def _paged_attention(query, key_cache, value_cache, block_tables, seq_lens, cu_seqlens_q, scale, sliding_window,
                     softcap, max_seqlen_q, key=None, value=None, fresh=False, sinks=None, chunk_size=None):
    if _use_triton(query):
        from hf_paged.kernels.paged_attention import paged_attention as triton_paged_attention

        return triton_paged_attention(query, key_cache, value_cache, block_tables, seq_lens, cu_seqlens_q, scale,
                                      sliding_window, softcap, max_seqlen_q, key, value, fresh=fresh, sinks=sinks,
                                      chunk_size=chunk_size)
    return _torch_attention(query, key_cache, value_cache, block_tables, seq_lens, cu_seqlens_q, scale, sliding_window,
                            softcap, sinks, None, chunk_size)


def _torch_attention(query, key_cache, value_cache, block_tables, seq_lens, cu_seqlens_q, scale, sliding_window,
                     softcap, sinks, expand, chunk_size):
    """The torch paths: the reference's per-sequence loop under HF_PAGED_KERNELS=reference, else kernels/batched.py."""
    attend = reference.paged_attention if _mode() == "reference" else batched.paged_attention
    return attend(query, key_cache, value_cache, block_tables, seq_lens, cu_seqlens_q, scale, sliding_window, softcap,
                  sinks, expand, chunk_size)


# NOTE: eager calls take the plain functions above; only compiled graphs go through the dispatcher (a custom op
# call costs tens of microseconds of host time).
_paged_attention_op = torch.library.custom_op(
    "hf_paged::paged_attention", _paged_attention, mutates_args=(),
    schema="(Tensor query, Tensor key_cache, Tensor value_cache, Tensor block_tables, Tensor seq_lens, "
           "Tensor cu_seqlens_q, float scale, SymInt? sliding_window, float? softcap, SymInt? max_seqlen_q, "
           "Tensor? key=None, Tensor? value=None, bool fresh=False, Tensor? sinks=None, SymInt? chunk_size=None) "
           "-> Tensor",
)


@_paged_attention_op.register_fake
def _(query, key_cache, value_cache, block_tables, seq_lens, cu_seqlens_q, scale, sliding_window, softcap,
      max_seqlen_q, key=None, value=None, fresh=False, sinks=None, chunk_size=None):
    return torch.empty_like(query, memory_format=torch.contiguous_format)  # (T, Hq, D)


def latent_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    scale: float,
    expand,
    sliding_window: int | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """`paged_attention` over caches of latents (multi-head latent attention: DeepSeek-V2/V3, MiniCPM3, ...): each
    sequence's cached latents, read through its block table, become its K/V by the model's own `expand(k, v)`
    (the attention module's `expand_kv`), as they do under DynamicCache. Torch on every device: the latents are
    paged and shared like any K/V, the attention runs batched (kernels/batched.py), or per sequence under
    HF_PAGED_KERNELS=reference. Returns [num_tokens, num_q_heads, Dv]."""
    return _torch_attention(query, key_cache, value_cache, block_tables, seq_lens, cu_seqlens_q, scale, sliding_window,
                            softcap, sinks, expand, chunk_size)


def write_and_attend(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
    max_seqlen_q: int | None = None,
    fresh: bool = False,
    sinks: torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """`write_kv(key, value, ..., slot_mapping)`, then `paged_attention` with the step's own K/V: one launch on the
    Triton path (the kernels store the new tokens while they attend), the two calls on the torch paths.

    key, value: [num_tokens, num_kv_heads, head_dim] in the caches' dtype, rows packed like query's.
    fresh: no sequence has context before its new tokens; sinks, chunk_size: see `paged_attention`.
    NOTE: a token with slot -1 (padding) stores nothing, and which K/V the rows that see it read is unspecified.
    Under torch.compile it is the custom op `hf_paged::write_and_attend`, which mutates the two caches.
    """
    if torch.compiler.is_compiling():
        return torch.ops.hf_paged.write_and_attend(query, key, value, key_cache, value_cache, slot_mapping,
                                                   block_tables, seq_lens, cu_seqlens_q, scale, sliding_window,
                                                   softcap, max_seqlen_q, fresh, sinks, chunk_size)
    return _write_and_attend(query, key, value, key_cache, value_cache, slot_mapping, block_tables, seq_lens,
                             cu_seqlens_q, scale, sliding_window, softcap, max_seqlen_q, fresh, sinks, chunk_size)


def _write_and_attend(query, key, value, key_cache, value_cache, slot_mapping, block_tables, seq_lens, cu_seqlens_q,
                      scale, sliding_window, softcap, max_seqlen_q, fresh=False, sinks=None,
                      chunk_size=None) -> torch.Tensor:
    if _use_triton(query):
        from hf_paged.kernels.paged_attention import paged_attention as triton_paged_attention

        return triton_paged_attention(query, key_cache, value_cache, block_tables, seq_lens, cu_seqlens_q, scale,
                                      sliding_window, softcap, max_seqlen_q, key, value, slot_mapping, fresh=fresh,
                                      sinks=sinks, chunk_size=chunk_size)
    _write_kv(key, value, key_cache, value_cache, slot_mapping)
    return _paged_attention(query, key_cache, value_cache, block_tables, seq_lens, cu_seqlens_q, scale,
                            sliding_window, softcap, max_seqlen_q, sinks=sinks, chunk_size=chunk_size)


_write_and_attend_op = torch.library.custom_op(
    "hf_paged::write_and_attend", _write_and_attend, mutates_args=("key_cache", "value_cache"),
    schema="(Tensor query, Tensor key, Tensor value, Tensor(a!) key_cache, Tensor(b!) value_cache, "
           "Tensor slot_mapping, Tensor block_tables, Tensor seq_lens, Tensor cu_seqlens_q, float scale, "
           "SymInt? sliding_window, float? softcap, SymInt? max_seqlen_q, bool fresh=False, Tensor? sinks=None, "
           "SymInt? chunk_size=None) -> Tensor",
)


@_write_and_attend_op.register_fake
def _(query, key, value, key_cache, value_cache, slot_mapping, block_tables, seq_lens, cu_seqlens_q, scale,
      sliding_window, softcap, max_seqlen_q, fresh=False, sinks=None, chunk_size=None):
    return torch.empty_like(query, memory_format=torch.contiguous_format)  # (T, Hq, D)


def write_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Store key/value [num_tokens, num_kv_heads, head_dim] into the cache slots of `slot_mapping` (-1: skip).

    Under torch.compile it is the custom op `hf_paged::write_kv`, which mutates the two caches.
    """
    if torch.compiler.is_compiling():
        return torch.ops.hf_paged.write_kv(key, value, key_cache, value_cache, slot_mapping)
    return _write_kv(key, value, key_cache, value_cache, slot_mapping)


def _write_kv(key, value, key_cache, value_cache, slot_mapping) -> None:
    if _use_triton(key_cache):
        from hf_paged.kernels.kv_write import write_kv as triton_write_kv

        return triton_write_kv(key, value, key_cache, value_cache, slot_mapping)
    return reference.write_kv(key, value, key_cache, value_cache, slot_mapping)


_write_kv_op = torch.library.custom_op(
    "hf_paged::write_kv", _write_kv, mutates_args=("key_cache", "value_cache"),
    schema="(Tensor key, Tensor value, Tensor(a!) key_cache, Tensor(b!) value_cache, Tensor slot_mapping) -> ()",
)


@_write_kv_op.register_fake
def _(key, value, key_cache, value_cache, slot_mapping) -> None:
    return None


def copy_blocks(key_cache: torch.Tensor, value_cache: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> None:
    """Copy whole blocks src[i] -> dst[i] in both caches (copy-on-write)."""
    if _use_triton(key_cache):
        from hf_paged.kernels.block_copy import copy_blocks as triton_copy_blocks

        return triton_copy_blocks(key_cache, value_cache, src, dst)
    return reference.copy_blocks(key_cache, value_cache, src, dst)


SKINNY_MATMUL = ("off", "on", "16", "32", "64")
SKINNY_ROWS = 16  # the most rows `linear` sends the skinny matmul by default (one 16-row dot operand)
SKINNY_MAX_ROWS = 64  # the most rows kernels/skinny_matmul.py takes (x padded to a 16-, 32- or 64-row operand)


def skinny_matmul() -> int:
    """`HF_PAGED_SKINNY_MATMUL`: the most rows of x for which the engine's projections (engine/fused.py) take the
    skinny matmul (kernels/skinny_matmul.py) through `linear` instead of cuBLAS: 0 (off, the default), 16 (on: decode
    steps of up to 16 sequences), 32 or 64. Else a ValueError."""
    value = env_choice("HF_PAGED_SKINNY_MATMUL", SKINNY_MATMUL)
    return {"off": 0, "on": SKINNY_ROWS}[value] if value in ("off", "on") else int(value)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           max_rows: int = SKINNY_ROWS) -> torch.Tensor:
    """`F.linear(x, weight, bias)`; on the Triton path, with x of at most `max_rows` rows (SKINNY_MAX_ROWS at most),
    the skinny matmul.

    Under torch.compile it is the opaque custom op `hf_paged::linear`, which picks per call: one graph with a
    dynamic token count serves every batch size, and each decode CUDA graph captures the kernel its size takes.
    """
    if torch.compiler.is_compiling():
        return torch.ops.hf_paged.linear(x, weight, bias, max_rows)
    return _linear(x, weight, bias, max_rows)


def _skinny_fits(x, weight, bias, max_rows) -> bool:
    return (x.numel() <= min(max_rows, SKINNY_MAX_ROWS) * x.shape[-1] and x.dtype == weight.dtype and x.stride(-1) == 1
            and weight.stride(-1) == 1 and (bias is None or (bias.dtype == x.dtype and bias.stride(0) == 1)))


def _linear(x, weight, bias=None, max_rows=SKINNY_ROWS) -> torch.Tensor:
    if _skinny_fits(x, weight, bias, max_rows) and _use_triton(x):
        from hf_paged.kernels.skinny_matmul import skinny_linear

        return skinny_linear(x, weight, bias)
    return torch.nn.functional.linear(x, weight, bias)


_linear_op = torch.library.custom_op(
    "hf_paged::linear", _linear, mutates_args=(),
    schema=f"(Tensor x, Tensor weight, Tensor? bias=None, int max_rows={SKINNY_ROWS}) -> Tensor")


@_linear_op.register_fake
def _(x, weight, bias=None, max_rows=SKINNY_ROWS):
    return x.new_empty(*x.shape[:-1], weight.shape[0])  # (..., N)
