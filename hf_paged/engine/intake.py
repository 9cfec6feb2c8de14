"""What a request must be before the engine takes it: a prompt it can encode, an adapter it has, a size it fits."""

from __future__ import annotations


class RequestError(ValueError):
    """A request the engine cannot take (empty or too-long prompt, unknown token ids, duplicate id, ...)."""


def encode_prompt(prompt, tokenizer, vocab_size: int) -> tuple[str | None, list[int]]:
    """(the prompt's text or None, its token ids) from a string or a list of token ids."""
    if isinstance(prompt, str):
        if tokenizer is None:
            raise RequestError("string prompts need a tokenizer; pass token ids or give the engine a tokenizer")
        if not prompt:
            raise RequestError("the prompt is empty")
        return prompt, tokenizer.encode(prompt)
    if not isinstance(prompt, (list, tuple)) or not all(isinstance(t, int) for t in prompt):
        raise RequestError(f"a prompt is a string or a list of token ids, got {type(prompt).__name__}")
    if not prompt:
        raise RequestError("the prompt is empty")
    bad = [t for t in prompt if not 0 <= t < vocab_size]
    if bad:
        raise RequestError(f"token ids {bad[:5]} are outside the vocabulary (size {vocab_size})")
    return None, list(prompt)


def check_adapter(model, adapter: str | None) -> None:
    """`adapter` must be one of the PEFT model's loaded LoRA adapters (None: the active one)."""
    if adapter is None:
        return
    loaded = sorted(getattr(model, "peft_config", None) or {})
    if not loaded:
        raise RequestError(f"adapter {adapter!r} requested but the model is not a PEFT model with adapters")
    if adapter not in loaded:
        raise RequestError(f"unknown adapter {adapter!r}; the model has {loaded}")


def check_fits(prompt_len: int, max_tokens: int, width: int, max_model_len: int, block_size: int,
               num_blocks: int) -> None:
    """The prompt leaves room for a token, and `width` sequences of the longest length fit the whole pool."""
    if prompt_len >= max_model_len:
        raise RequestError(
            f"the prompt has {prompt_len} tokens; the model takes at most {max_model_len - 1} "
            f"(max_model_len={max_model_len}) to leave room for one new token"
        )
    length = min(prompt_len + max_tokens, max_model_len)
    blocks = width * -(-length // block_size)
    if blocks > num_blocks:
        raise RequestError(
            f"the request needs up to {blocks} KV blocks ({width} x {length} tokens) but the pool has "
            f"{num_blocks}; lower max_tokens / n or give the engine more KV memory"
        )
