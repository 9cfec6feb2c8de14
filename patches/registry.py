"""Register the "paged" attention and its mask function with transformers."""

from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from hf_paged.attention import paged_attention_forward, paged_mask

ATTN_NAME = "paged"


def apply_attention_registration() -> None:
    AttentionInterface.register(ATTN_NAME, paged_attention_forward)
    # Without a mask function of the same name transformers hands the attention no padding mask at all.
    AttentionMaskInterface.register(ATTN_NAME, paged_mask)


def is_attention_registered() -> bool:
    return (
        AttentionInterface._global_mapping.get(ATTN_NAME) is paged_attention_forward
        and AttentionMaskInterface._global_mapping.get(ATTN_NAME) is paged_mask
    )
