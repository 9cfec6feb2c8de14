"""Route ``generate(cache_implementation="paged")`` to ordinary generate with a PagedCache.

transformers reroutes a ``cache_implementation="paged"`` *kwarg* to its own continuous batching (``generate_batch``),
which loses padding, beams, streamers and ``return_dict_in_generate``. Two small wrappers replace that:
- ``generate``: takes the "paged" request (kwarg, passed GenerationConfig or the model's own), switches the model's
  attention to "paged" for the call only, and runs the ordinary generate loop;
- ``_prepare_cache_for_generation``: builds the PagedCache there (where transformers builds its caches), sized for
  the expanded batch, and tells it the rows' padding and prompt copies (beams, num_return_sequences).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from dataclasses import dataclass

from transformers import GenerationConfig
from transformers.generation.utils import GenerationMixin

from hf_paged.blocks import DEFAULT_BLOCK_SIZE
from hf_paged.cache import PagedCache

_ORIGINAL_ATTR = "__hf_paged_original__"
CACHE_CONFIG_KEYS = ("block_size", "num_blocks", "kv_cache_memory")


@dataclass(slots=True)
class _PagedRequest:
    model: object


# NOTE: the one step-context of hf_paged: which model's current generate call asked for "paged" through the kwarg
# (the kwarg must be removed before transformers sees it, or it reroutes to generate_batch). Keyed by the model so
# an assistant model's nested generate is not affected.
_REQUEST: contextvars.ContextVar[_PagedRequest | None] = contextvars.ContextVar("hf_paged_request", default=None)


def _wants_paged(model, generation_config: GenerationConfig | None) -> bool:
    config = generation_config if generation_config is not None else getattr(model, "generation_config", None)
    return getattr(config, "cache_implementation", None) == "paged"


def _check_model_supported(model) -> None:
    if model.config.is_encoder_decoder:
        raise ValueError(
            f"cache_implementation='paged' supports decoder-only models; {type(model).__name__} is encoder-decoder"
        )
    if not model._supports_default_dynamic_cache():
        raise ValueError(f"cache_implementation='paged' does not support {type(model).__name__} (no Cache support)")
    # PEFT prompt learning (prefix / prompt / p-tuning) swaps in its own prepare_inputs_for_generation, which feeds
    # the virtual tokens as a ready-made DynamicCache: there is no paged equivalent yet.
    reject_prompt_learning(getattr(model.prepare_inputs_for_generation, "__self__", None))


def reject_prompt_learning(peft_model) -> None:
    """Raise if `peft_model` is a PEFT model whose active adapter is prompt learning (no paged support)."""
    peft_config = getattr(peft_model, "active_peft_config", None)
    if getattr(peft_config, "is_prompt_learning", False):
        raise ValueError(
            f"cache_implementation='paged' does not support PEFT prompt learning ({peft_config.peft_type}: prefix, "
            "prompt or p-tuning adapters pass their virtual tokens as a DynamicCache); use the default cache, or a "
            "LoRA adapter"
        )


@contextlib.contextmanager
def paged_attention(model, enabled: bool = True):
    """Use the "paged" attention for the duration of the block, then restore the model's own setting."""
    previous = model.config._attn_implementation
    switch = enabled and previous != "paged" and model._can_set_attn_implementation()
    if switch:
        model.set_attn_implementation("paged")
    try:
        yield
    finally:
        if switch:
            model.set_attn_implementation(previous)


def _generate(original, self, inputs=None, generation_config=None, **kwargs):
    user_cache = kwargs.get("cache", kwargs.get("past_key_values"))
    kwarg_paged = kwargs.get("cache_implementation") == "paged"
    if not (kwarg_paged or _wants_paged(self, generation_config) or isinstance(user_cache, PagedCache)):
        return original(self, inputs, generation_config, **kwargs)
    _check_model_supported(self)
    if kwargs.get("use_cache") is False or getattr(generation_config, "use_cache", None) is False:
        raise ValueError("cache_implementation='paged' needs use_cache=True")
    # Asking for the paged cache asks for a cache: a model whose own generation config turns it off (MPT: MptConfig
    # has use_cache=False) would otherwise skip transformers' cache set-up and feed the whole sequence at every step.
    kwargs["use_cache"] = True
    token = None
    if kwarg_paged:
        kwargs.pop("cache_implementation")
        if user_cache is not None:
            raise ValueError("pass either cache_implementation='paged' or cache=PagedCache(...), not both")
        token = _REQUEST.set(_PagedRequest(self))
    # Attention weights need the eager path: keep the model's attention, the PagedCache still serves it.
    wants_weights = kwargs.get("output_attentions") or getattr(generation_config, "output_attentions", False)
    try:
        with paged_attention(self, enabled=not wants_weights):
            return original(self, inputs, generation_config, **kwargs)
    finally:
        if token is not None:
            _REQUEST.reset(token)


def _build_cache(model, generation_config: GenerationConfig, rows: int, max_cache_length: int) -> PagedCache:
    options = dict(generation_config.cache_config or {})
    unknown = sorted(set(options) - set(CACHE_CONFIG_KEYS))
    if unknown:
        raise ValueError(f"unknown cache_config keys for cache_implementation='paged': {unknown}; use {CACHE_CONFIG_KEYS}")
    block_size = options.get("block_size", DEFAULT_BLOCK_SIZE)
    budget = {k: options[k] for k in ("num_blocks", "kv_cache_memory") if k in options}
    if not budget:
        # Enough for every row to reach max_length unshared, plus one copy-on-write block per row.
        budget["num_blocks"] = rows * (math.ceil((max_cache_length + 1) / block_size) + 1)
    return PagedCache(model.config, block_size=block_size, dtype=model.dtype, **budget)


def _prepare_cache_for_generation(
    original, self, generation_config, model_kwargs, generation_mode, batch_size, max_cache_length, *args, **kwargs
):
    request = _REQUEST.get()
    paged = (request is not None and request.model is self) or generation_config.cache_implementation == "paged"
    group = max(generation_config.num_beams or 1, generation_config.num_return_sequences or 1)
    rows = batch_size * group
    if paged and generation_config.use_cache is False:
        raise ValueError("cache_implementation='paged' needs use_cache=True")
    if paged and model_kwargs.get("cache") is None:
        if model_kwargs.get("past_key_values") is not None:
            raise ValueError("pass either cache_implementation='paged' or a cache, not both")
        model_kwargs["cache"] = _build_cache(self, generation_config, rows, max_cache_length)
    else:
        original(self, generation_config, model_kwargs, generation_mode, batch_size, max_cache_length, *args, **kwargs)
    cache = model_kwargs.get("cache", model_kwargs.get("past_key_values"))
    if isinstance(cache, PagedCache):
        cache.begin_generate(model_kwargs.get("attention_mask"), rows, group)


def _wrap(cls, name: str, wrapper) -> None:
    current = getattr(cls, name)
    if getattr(current, _ORIGINAL_ATTR, None) is not None:
        return  # already patched
    @functools.wraps(current)
    def method(self, *args, **kwargs):
        return wrapper(current, self, *args, **kwargs)

    setattr(method, _ORIGINAL_ATTR, current)
    setattr(cls, name, method)


def apply_generate_patch() -> None:
    _wrap(GenerationMixin, "generate", _generate)
    _wrap(GenerationMixin, "_prepare_cache_for_generation", _prepare_cache_for_generation)


def is_generate_patched() -> bool:
    return all(
        getattr(getattr(GenerationMixin, name), _ORIGINAL_ATTR, None) is not None
        for name in ("generate", "_prepare_cache_for_generation")
    )
