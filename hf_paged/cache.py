"""PagedCache: a transformers.Cache whose KV lives in fixed-size blocks of one shared pool per layer.

Each row of the batch `generate` runs is a sequence with its own block table. Rows that are copies of one
prompt (beam search, num_return_sequences) share their prompt blocks; beam search forks tables in
`reorder_cache` instead of copying KV, and a shared partial block is copied on write.

Left padding is never stored: the cache keeps, per row, how many leading positions are padding, and
`get_seq_length` reports the padded (logical) length transformers expects.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedConfig
from transformers.cache_utils import Cache, CacheLayerMixin, get_layer_types_and_kwargs

from hf_paged.attention import KV_POOL_KEY, METADATA_KEY, SLOTS_KEY, LayerKV, PagedAttentionMetadata, token_rows
from hf_paged.blocks import DEFAULT_BLOCK_SIZE, BlockManager, BlockPool, BlockPoolExhausted, BlockTable
from hf_paged.kernels import ops
from hf_paged.transfer import to_device

SUPPORTED_LAYER_TYPES = ("full_attention", "sliding_attention", "chunked_attention")


@dataclass(slots=True)
class CacheStats:
    """A snapshot of the cache's memory. `waste` = unused slots of the blocks in use / all their slots."""

    num_blocks: int
    blocks_in_use: int
    tokens_stored: int
    bytes_per_block: int
    bytes_in_use: int
    bytes_reserved: int
    waste: float
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0


class PagedLayer(CacheLayerMixin):
    """One layer's K/V pools, [num_blocks, block_size, num_kv_heads, head_dim], allocated on first use."""

    is_compileable = False
    is_croppable = True

    def __init__(self, num_blocks: int, block_size: int, sliding_window: int | None = None,
                 chunk_size: int | None = None):
        super().__init__()
        self.num_blocks, self.block_size = num_blocks, block_size
        self.sliding_window = sliding_window
        self.chunk_size = chunk_size  # chunked attention (Llama4): the attention reads only the query's own chunk
        # NOTE: transformers treats chunked layers as sliding ones (create_chunked_causal_mask looks for one)
        self.is_sliding = sliding_window is not None or chunk_size is not None

    def pools(self) -> LayerKV:
        """The layer's pools and attention span, as the paged attention takes them."""
        return LayerKV(self.keys, self.values, self.sliding_window, self.chunk_size)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        # key_states: (B, Hkv, Q, D); the pool goes on the layer's own device (accelerate device_map placements).
        _, num_kv_heads, _, head_dim = key_states.shape
        shape = (self.num_blocks, self.block_size, num_kv_heads, head_dim)
        self.keys = torch.zeros(shape, dtype=key_states.dtype, device=key_states.device)
        self.values = torch.zeros(
            (*shape[:3], value_states.shape[-1]), dtype=value_states.dtype, device=value_states.device
        )
        self.device = key_states.device
        self.is_initialized = True

    # PagedCache drives its layers; the per-layer Cache API is answered at the cache level.
    def update(self, key_states, value_states, *args, **kwargs):
        raise NotImplementedError("PagedLayer is updated through PagedCache.update")

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        raise NotImplementedError("answered by PagedCache.get_mask_sizes")

    def get_seq_length(self) -> int:
        raise NotImplementedError("answered by PagedCache.get_seq_length")

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        pass


@dataclass(slots=True)
class StepPlan:
    """Where one forward's K/V go and how attention reads them (shared by every layer)."""

    slot_mapping: torch.Tensor  # (B*Q,) int64, -1 = not stored
    copies: list[tuple[int, int]]  # copy-on-write (src, dst) blocks, applied before writing
    metadata: PagedAttentionMetadata


def _layer_kv_values(config: PreTrainedConfig) -> list[int]:
    """The K and V values each layer caches per token, from a decoder config. Multi-head latent attention
    (DeepSeek-V2/V3, MiniCPM3, ...) caches its compressed latent and shared rotary key, one "head" each.

    Heterogeneous configs (transformers' `per_layer_config`, e.g. Gemma4's full-attention layers with
    `global_head_dim` / `num_global_key_value_heads`) vary head_dim and num_key_value_heads by layer, and raise
    AmbiguousGlobalPerLayerAttributeError when they are read on the global config: read them per layer.
    """
    if getattr(config, "kv_lora_rank", None):
        return [config.kv_lora_rank + config.qk_rope_head_dim] * config.num_hidden_layers
    values = []
    for layer_config in config.per_layer_config:
        num_heads = layer_config.num_attention_heads
        num_kv_heads = getattr(layer_config, "num_key_value_heads", None) or num_heads
        head_dim = getattr(layer_config, "head_dim", None) or layer_config.hidden_size // num_heads
        values.append(2 * num_kv_heads * head_dim)
    return values


def _kv_sharing_layers(config: PreTrainedConfig) -> tuple[set[int], set[int]]:
    """(consumers, producers) of KV sharing between layers (Gemma4's num_kv_shared_layers), both empty without it.

    A consumer ("reuse") computes no K/V and calls no cache.update: it attends over the K/V that the last earlier
    layer of its type (the "store" producer) got back from cache.update, handed over in the model's
    `shared_kv_states`.
    """
    modes = getattr(config, "kv_sharing_modes", None) or []
    consumers = {i for i, mode in enumerate(modes) if mode == "reuse"}
    consumer_types = {config.layer_types[i] for i in consumers}
    producers = {i for i, mode in enumerate(modes) if mode == "store" and config.layer_types[i] in consumer_types}
    return consumers, producers


# Models whose attention reshapes the K/V that cache.update hands back before attending (transformers 5.24): the
# paged attention reads the pools instead, so their outputs would be wrong without an error. Refused by name.
# (JetMoE tiles its K/V heads over its experts: served, attention.TILED_KV_MODULES.)
RESHAPES_KV_AFTER_UPDATE = {"diffllama": "its differential attention splits V into two halves"}


def _check_layer_types(config: PreTrainedConfig, layer_types: list[str], consumers: set[int]) -> None:
    name = type(config).__name__
    if config.model_type in RESHAPES_KV_AFTER_UPDATE:
        raise ValueError(f"PagedCache does not support {name} yet: {RESHAPES_KV_AFTER_UPDATE[config.model_type]} "
                         "after cache.update, which the paged attention does not see")
    stored = [t for i, t in enumerate(layer_types) if i not in consumers]  # consumers are "dummy": they store nothing
    unsupported = sorted({t for t in stored if t not in SUPPORTED_LAYER_TYPES})
    if unsupported:
        raise ValueError(f"PagedCache does not support layer types {unsupported} ({name})")
    # NOTE: the paged attention is causal; Gemma4's use_bidirectional_attention="all" (is_causal False) is not.
    if getattr(config, "use_bidirectional_attention", None) == "all" or getattr(config, "is_causal", True) is False:
        raise ValueError(f"PagedCache's attention is causal; {name} uses bidirectional attention")


class PagedCache(Cache):
    """KV cache in fixed-size blocks of a shared pool, with per-sequence block tables and ref-counted blocks.

    Args:
        config: the model's config (its decoder config is used).
        num_blocks: blocks in the pool. Give this or `kv_cache_memory`.
        kv_cache_memory: a budget in bytes for all layers' K and V; turned into a number of blocks.
        block_size: tokens per block (`DEFAULT_BLOCK_SIZE`, 8; vLLM's is 16).
        dtype: the KV dtype, used to turn `kv_cache_memory` into blocks (default: torch's default dtype).
        enable_prefix_caching: keep freed full blocks findable by content hash (the engine's prefix cache).

    Example:
        >>> import hf_paged
        >>> cache = hf_paged.PagedCache(model.config, num_blocks=256)
        >>> out = model.generate(**inputs, cache=cache, max_new_tokens=32)
        >>> cache.stats().waste
    """

    def __init__(
        self,
        config: PreTrainedConfig,
        num_blocks: int | None = None,
        kv_cache_memory: int | None = None,
        block_size: int = DEFAULT_BLOCK_SIZE,
        dtype: torch.dtype | None = None,
        enable_prefix_caching: bool = False,
    ):
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.config = config.get_text_config(decoder=True)
        layer_types, layer_kwargs = get_layer_types_and_kwargs(self.config)
        consumers, self.kv_producers = _kv_sharing_layers(self.config)
        _check_layer_types(self.config, layer_types, consumers)
        itemsize = torch.empty((), dtype=dtype or torch.get_default_dtype()).element_size()
        # over the layers that store K/V (KV-sharing consumers store none)
        kv_per_token = sum(n for i, n in enumerate(_layer_kv_values(self.config)) if i not in consumers)
        self.bytes_per_block = block_size * kv_per_token * itemsize
        if (num_blocks is None) == (kv_cache_memory is None):
            raise ValueError("give exactly one of num_blocks or kv_cache_memory")
        if num_blocks is None:
            num_blocks = kv_cache_memory // self.bytes_per_block
            if num_blocks < 1:
                raise ValueError(
                    f"kv_cache_memory={kv_cache_memory} bytes holds no block of {self.bytes_per_block} bytes"
                )
        # get_layer_types_and_kwargs gives chunked layers their attention_chunk_size as "sliding_window"
        spans = [(kw.get("sliding_window"), layer_type == "chunked_attention")
                 for layer_type, kw in zip(layer_types, layer_kwargs)]
        layers = [PagedLayer(num_blocks, block_size, None if chunked else span, span if chunked else None)
                  for span, chunked in spans]
        super().__init__(layers=layers)
        self.block_size = block_size
        self.pool = BlockPool(num_blocks, enable_prefix_caching=enable_prefix_caching)
        self.manager = BlockManager(self.pool, block_size)
        self.tables: list[BlockTable] = []
        self.pad_counts: list[int] = []  # leading padding positions per row (never stored)
        self.group_size = 1  # rows r*g .. r*g+g-1 start as copies of one prompt
        self.logical_len = 0  # positions seen per row, padding included (what DynamicCache would hold)
        self._plan: StepPlan | None = None
        self._last_layer = -1
        self._step_len = 0  # positions the current forward adds (logical_len already counts them)
        # the last layer that calls update ("dummy" layers, KV-sharing consumers, never do)
        self._last_storing_layer = max((i for i, t in enumerate(layer_types) if t != "dummy"), default=-1)
        # Engine mode: the engine owns the block tables and hands each forward its plan.
        self._engine_plan: StepPlan | None = None
        self.pools_bound = False  # the engine's compiled layers hold their pools (attention.bind_pools)

    # ----------------------------------------------------------------------------------------------- set-up
    def begin_generate(self, attention_mask: torch.Tensor | None, batch_size: int, group_size: int = 1) -> None:
        """Called by the generate patch before the first forward: rows, their padding and prompt copies.

        Args:
            attention_mask: [B, L] 2D mask of the (expanded) prompt, or None when nothing is padded.
            batch_size: B, the number of rows (after beam / num_return_sequences expansion).
            group_size: how many consecutive rows are copies of one prompt.
        """
        if self.logical_len:
            raise ValueError("this PagedCache already holds a generation; call reset() or build a new one")
        pads = [0] * batch_size
        if attention_mask is not None:
            mask = attention_mask.bool()
            lengths = mask.sum(-1)
            # Left padding only: each row's ones must be one contiguous run ending at the last position.
            is_left_padded = mask.flip(-1).cumprod(-1).sum(-1) == lengths
            if not bool(is_left_padded.all()):
                raise ValueError(
                    "cache_implementation='paged' supports left-padded batches only (tokenizer.padding_side='left');"
                    " the attention_mask has padding after real tokens"
                )
            pads = (mask.shape[-1] - lengths).tolist()
        self.pad_counts = pads
        self.group_size = group_size if batch_size % group_size == 0 else 1

    def set_step(self, plan: StepPlan | None) -> None:
        """Engine mode: the next forward uses `plan` (packed [1, T] batch, tables managed by the caller)."""
        self._engine_plan = plan

    # ----------------------------------------------------------------------------------------------- the step
    def _plan_step(self, batch: int, q_len: int, device: torch.device) -> StepPlan:
        if not self.pad_counts:
            self.pad_counts = [0] * batch
        if len(self.pad_counts) != batch:
            raise ValueError(f"PagedCache holds {len(self.pad_counts)} rows but the forward has {batch}")
        first_step = not self.tables
        if first_step:
            self.tables = [self.manager.new_table() for _ in range(batch)]
        start = self.logical_len
        new_tokens = [max(0, start + q_len - max(start, pad)) for pad in self.pad_counts]
        follower = [first_step and self.group_size > 1 and b % self.group_size != 0 for b in range(batch)]
        writers = [b for b in range(batch) if not follower[b] and new_tokens[b]]
        needed = sum(self.manager.blocks_needed(self.tables[b], new_tokens[b]) for b in writers)
        if needed > self.pool.num_free_blocks:
            # Raise before touching any table: the cache stays as it was.
            raise BlockPoolExhausted(needed, self.pool.num_free_blocks, self.pool.num_blocks)
        slot_mapping = [-1] * (batch * q_len)
        copies = []
        for b in writers:
            result = self.manager.append(self.tables[b], new_tokens[b])
            copies += result.copies
            first = b * q_len + q_len - new_tokens[b]
            slot_mapping[first : first + new_tokens[b]] = result.slots
        for b in range(batch):
            if follower[b]:
                leader = b - b % self.group_size
                self.tables[b] = self.manager.fork(self.tables[leader])
        return self._build_plan(slot_mapping, copies, new_tokens, q_len, device)

    def _build_plan(self, slot_mapping, copies, new_tokens, q_len, device) -> StepPlan:
        batch = len(self.tables)
        max_blocks = max(1, max(len(t.block_ids) for t in self.tables))
        block_tables = torch.zeros((batch, max_blocks), dtype=torch.int32)
        for b, table in enumerate(self.tables):
            block_tables[b, : len(table.block_ids)] = torch.tensor(table.block_ids, dtype=torch.int32)
        cu = [0]
        for n in new_tokens:
            cu.append(cu[-1] + n)
        query_index = None
        if cu[-1] != batch * q_len:
            query_index = torch.tensor(
                [b * q_len + q_len - n + i for b, n in enumerate(new_tokens) for i in range(n)],
                dtype=torch.long,
                device=device,
            )
        metadata = PagedAttentionMetadata(
            block_tables=block_tables.to(device),
            seq_lens=torch.tensor([t.num_tokens for t in self.tables], dtype=torch.int32, device=device),
            cu_seqlens_q=torch.tensor(cu, dtype=torch.int32, device=device),
            query_index=query_index,
            max_seqlen_q=max(new_tokens),
            fresh=all(t.num_tokens == n for t, n in zip(self.tables, new_tokens)),
        )
        return StepPlan(torch.tensor(slot_mapping, dtype=torch.long, device=device), copies, metadata)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's K/V [B, Hkv, Q, D] for `layer_idx` in the pool.

        With the "paged" attention the new states are returned as they are and the attention reads the pool
        through the metadata put in `kwargs`; with any other attention the row's whole K/V comes back contiguous,
        left-padded with zeros to the logical length, as DynamicCache would hold it.
        """
        if self._engine_plan is not None and self.pools_bound:
            # The engine's compiled layers: the attention writes into the pools bound to its module (nothing here
            # may depend on layer_idx, or every layer would compile apart).
            call_kwargs = kwargs["kwargs"]
            call_kwargs[METADATA_KEY] = self._engine_plan.metadata
            call_kwargs[SLOTS_KEY] = self._engine_plan.slot_mapping
            return key_states, value_states
        batch, _, q_len, _ = key_states.shape
        if self._engine_plan is not None:
            self._plan = self._engine_plan
        elif self._plan is None or layer_idx <= self._last_layer:
            self._plan = self._plan_step(batch, q_len, key_states.device)
            self.logical_len += q_len
            self._step_len = q_len
        self._last_layer = layer_idx
        layer = self.layers[layer_idx]
        if not layer.is_initialized:
            layer.lazy_initialization(key_states, value_states)
        plan = self._plan
        slot_mapping = plan.slot_mapping.to(layer.device)
        _copy_blocks(layer, plan.copies)
        ops.write_kv(token_rows(key_states), token_rows(value_states), layer.keys, layer.values, slot_mapping)

        call_kwargs = kwargs.get("kwargs")
        if self._engine_plan is not None and not (
            self.config._attn_implementation == "paged" and isinstance(call_kwargs, dict)
        ):
            raise ValueError(
                f"{type(self.config).__name__}: the engine needs the 'paged' attention and attention modules that "
                "pass their kwargs to cache.update (this model's do not)"
            )
        # KV-sharing producers hand their K/V to later layers (shared_kv_states) that get no block tables: they
        # return the whole contiguous K/V, attended by the contiguous path, as with any other attention.
        if (self.config._attn_implementation == "paged" and isinstance(call_kwargs, dict)
                and layer_idx not in self.kv_producers):
            call_kwargs[METADATA_KEY] = _to_device(plan.metadata, layer.device)
            call_kwargs[KV_POOL_KEY] = layer.pools()
            return key_states, value_states
        return self._contiguous_kv(layer)

    def _contiguous_kv(self, layer: PagedLayer) -> tuple[torch.Tensor, torch.Tensor]:
        """Every row's K/V as [B, Hkv, logical_len, D], stored tokens right-aligned, padding as zeros."""
        keys = layer.keys.new_zeros((len(self.tables), self.logical_len, *layer.keys.shape[2:]))
        values = layer.values.new_zeros((len(self.tables), self.logical_len, *layer.values.shape[2:]))
        for b, table in enumerate(self.tables):
            n = table.num_tokens
            if n == 0:
                continue
            index = torch.tensor([table.slot(p) for p in range(n)], dtype=torch.long, device=layer.device)
            keys[b, self.logical_len - n :] = layer.keys.view(-1, *layer.keys.shape[2:])[index]
            values[b, self.logical_len - n :] = layer.values.view(-1, *layer.values.shape[2:])[index]
        return keys.transpose(1, 2), values.transpose(1, 2)  # (B, Hkv, L, D)

    # ------------------------------------------------------------------------------------- the Cache API
    # NOTE: in engine mode the forward is a packed [1, T] batch whose metadata carries all positions; transformers'
    # own mask is then a plain causal skip (kv length == query length) that the paged attention ignores.
    def get_seq_length(self, layer_idx: int = 0) -> int:
        if self._engine_plan is not None:
            return 0
        # Mid-forward, a layer that has not stored this step's tokens yet holds the length before them, as in
        # DynamicCache (Llama4's attn_temperature_tuning reads it before its layer's update).
        if self._plan is not None and self._last_layer < layer_idx <= self._last_storing_layer:
            return self.logical_len - self._step_len
        return self.logical_len

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return self.get_seq_length()

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_initialized(self) -> bool:
        return bool(self.tables)

    @property
    def batch_size(self) -> int:
        return len(self.tables) if self.tables else -1

    def _end_step(self) -> None:
        self._plan = None
        self._last_layer = -1

    def _replace_rows(self, sources: list[int]) -> None:
        """Row b becomes a fork of old row sources[b]; the old tables are released afterwards."""
        self._end_step()
        if not self.tables:
            self.pad_counts = [self.pad_counts[s] for s in sources] if self.pad_counts else []
            return
        new_tables = [self.manager.fork(self.tables[s]) for s in sources]
        for table in self.tables:
            self.manager.free(table)
        self.tables = new_tables
        self.pad_counts = [self.pad_counts[s] for s in sources]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: fork the chosen beams' block tables (ref counts, no KV copied)."""
        self._replace_rows(beam_idx.tolist())

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._replace_rows([b for b in range(len(self.pad_counts)) for _ in range(repeats)])

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._replace_rows(indices.tolist())

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last `-tokens_to_remove` positions of every row (assisted decoding's rollback)."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative number of tokens to remove, got {tokens_to_remove}")
        self._end_step()
        n = -tokens_to_remove
        if n == 0:
            return
        if n > self.logical_len:
            raise ValueError(f"cannot remove {n} positions from a cache holding {self.logical_len}")
        self.logical_len -= n
        for b, table in enumerate(self.tables):
            keep = max(0, self.logical_len - self.pad_counts[b])
            self.manager.truncate(table, keep)

    def reset(self) -> None:
        """Free every block and forget the rows; the pools stay allocated for the next generation."""
        self._end_step()
        for table in self.tables:
            self.manager.free(table)
        self.tables, self.pad_counts, self.logical_len, self.group_size = [], [], 0, 1

    def apply_copies(self, copies: list[tuple[int, int]]) -> None:
        """Copy-on-write copies for every layer now (the CUDA-graph path, whose captured plan has none)."""
        indices: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}  # one copy of the ids per device
        for layer in self.layers:
            if layer.is_initialized and copies:
                if layer.device not in indices:
                    indices[layer.device] = _block_ids(copies, layer.device)
                ops.copy_blocks(layer.keys, layer.values, *indices[layer.device])

    # ------------------------------------------------------------------------------------------- swap
    @torch.inference_mode()
    def swap(self, swap_out: list[tuple[int, int]], swap_in: list[tuple[int, int]], num_cpu_blocks: int) -> None:
        """Copy blocks device -> CPU (`swap_out`: (block, cpu_block)) then CPU -> device (`swap_in`), every layer.

        The CPU pools ([num_cpu_blocks, block_size, Hkv, D] per layer, pinned when a GPU is present) are allocated
        at the first swap.
        """
        if not swap_out and not swap_in:
            return
        if getattr(self, "_cpu_pools", None) is None:
            pin = torch.cuda.is_available()
            self._cpu_pools = [
                (torch.zeros((num_cpu_blocks, *layer.keys.shape[1:]), dtype=layer.keys.dtype, pin_memory=pin),
                 torch.zeros((num_cpu_blocks, *layer.values.shape[1:]), dtype=layer.values.dtype, pin_memory=pin))
                for layer in self.layers
            ]
        for layer, (cpu_keys, cpu_values) in zip(self.layers, self._cpu_pools):
            if swap_out:
                src = torch.tensor([d for d, _ in swap_out], dtype=torch.long, device=layer.device)
                dst = torch.tensor([c for _, c in swap_out], dtype=torch.long)
                cpu_keys[dst] = layer.keys[src].cpu()
                cpu_values[dst] = layer.values[src].cpu()
            if swap_in:
                src = torch.tensor([c for c, _ in swap_in], dtype=torch.long)
                dst = torch.tensor([d for _, d in swap_in], dtype=torch.long, device=layer.device)
                layer.keys[dst] = cpu_keys[src].to(layer.device, non_blocking=True)
                layer.values[dst] = cpu_values[src].to(layer.device, non_blocking=True)

    # ------------------------------------------------------------------------------------------- stats
    def stats(self) -> CacheStats:
        """Blocks in use, tokens stored (shared blocks counted once), bytes, and the waste fraction."""
        fill: dict[int, int] = {}
        for table in self.tables:
            for i, block_id in enumerate(table.block_ids):
                filled = min(self.block_size, table.num_tokens - i * self.block_size)
                fill[block_id] = max(fill.get(block_id, 0), filled)
        blocks_in_use = self.pool.num_used_blocks
        tokens = sum(fill.values())
        slots = blocks_in_use * self.block_size
        return CacheStats(
            num_blocks=self.pool.num_blocks,
            blocks_in_use=blocks_in_use,
            tokens_stored=tokens,
            bytes_per_block=self.bytes_per_block,
            bytes_in_use=blocks_in_use * self._actual_bytes_per_block(),
            bytes_reserved=self.pool.num_blocks * self._actual_bytes_per_block(),
            waste=(slots - tokens) / slots if slots else 0.0,
            prefix_cache_queries=self.pool.num_cache_queries,
            prefix_cache_hits=self.pool.num_cache_hits,
        )

    def _actual_bytes_per_block(self) -> int:
        """Bytes of one block over all initialized layers (exact once the pools exist), else the config estimate."""
        layers = [layer for layer in self.layers if layer.is_initialized]
        if not layers:
            return self.bytes_per_block
        return sum(
            (layer.keys[0].numel() * layer.keys.element_size() + layer.values[0].numel() * layer.values.element_size())
            for layer in layers
        )


def _copy_blocks(layer: PagedLayer, copies: list[tuple[int, int]]) -> None:
    """Copy-on-write: (src, dst) blocks of one layer's K and V pools."""
    if copies:
        ops.copy_blocks(layer.keys, layer.values, *_block_ids(copies, layer.device))


def _block_ids(copies: list[tuple[int, int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(src, dst) block ids of copy-on-write pairs as int64 tensors on `device`."""
    return to_device([s for s, _ in copies], torch.long, device), to_device([d for _, d in copies], torch.long, device)


def _to_device(meta: PagedAttentionMetadata, device: torch.device) -> PagedAttentionMetadata:
    if meta.block_tables.device == device:
        return meta
    return PagedAttentionMetadata(
        meta.block_tables.to(device),
        meta.seq_lens.to(device),
        meta.cu_seqlens_q.to(device),
        None if meta.query_index is None else meta.query_index.to(device),
        meta.max_seqlen_q,
    )
