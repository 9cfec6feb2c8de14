"""Tiny random models built from configs (no hub): one builder per architecture the tests cover."""

import torch
from transformers import (
    AutoModelForCausalLM,
    Cohere2Config,
    DeepseekV3Config,
    FalconConfig,
    Gemma2Config,
    Gemma3TextConfig,
    Gemma4TextConfig,
    JetMoeConfig,
    Llama4TextConfig,
    GPT2Config,
    GptOssConfig,
    GraniteSWAConfig,
    LlamaConfig,
    MistralConfig,
    MixtralConfig,
    MptConfig,
    Olmo2Config,
    Phi3Config,
    PhiConfig,
    Qwen2Config,
    Qwen3Config,
    Starcoder2Config,
)

VOCAB = 96
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=512, initializer_range=0.2, pad_token_id=0, bos_token_id=1, eos_token_id=2)

CONFIGS = {
    "llama": lambda: LlamaConfig(**COMMON, num_key_value_heads=2),
    "mistral": lambda: MistralConfig(**COMMON, num_key_value_heads=2, sliding_window=7),
    "qwen2": lambda: Qwen2Config(**COMMON, num_key_value_heads=2),
    "qwen2_sliding": lambda: Qwen2Config(
        **{**COMMON, "num_hidden_layers": 3}, num_key_value_heads=2, use_sliding_window=True, sliding_window=6,
        max_window_layers=1,
    ),
    "qwen3": lambda: Qwen3Config(**COMMON, num_key_value_heads=2, head_dim=32),
    "gemma2": lambda: Gemma2Config(
        **{**COMMON, "num_hidden_layers": 4}, num_key_value_heads=2, head_dim=16, sliding_window=6,
        attn_logit_softcapping=5.0, final_logit_softcapping=30.0, query_pre_attn_scalar=16,
    ),
    "phi3": lambda: Phi3Config(**COMMON, num_key_value_heads=4),
    "phi": lambda: PhiConfig(**COMMON, num_key_value_heads=4, partial_rotary_factor=0.5),
    "gemma3_text": lambda: Gemma3TextConfig(
        **{**COMMON, "num_hidden_layers": 3}, num_key_value_heads=2, head_dim=16, sliding_window=5,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"], query_pre_attn_scalar=16,
    ),
    "cohere2": lambda: Cohere2Config(
        **COMMON, num_key_value_heads=2, sliding_window=6, layer_types=["sliding_attention", "full_attention"],
    ),
    "starcoder2": lambda: Starcoder2Config(**COMMON, num_key_value_heads=2, sliding_window=7),
    "olmo2": lambda: Olmo2Config(**COMMON, num_key_value_heads=2),
    "falcon": lambda: FalconConfig(**COMMON, num_kv_heads=2, new_decoder_architecture=True),
    "mixtral": lambda: MixtralConfig(**COMMON, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2),
    "gpt_oss": lambda: GptOssConfig(  # attention sinks, sliding and full layers alternating
        **COMMON, num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2, sliding_window=6,
    ),
    "granite_swa": lambda: GraniteSWAConfig(**COMMON, num_key_value_heads=2, sliding_window=6),  # attention sinks
    "gemma4_text": lambda: Gemma4TextConfig(  # per-layer head dims, K = V on full layers, KV shared by the last 2
        **{**COMMON, "num_hidden_layers": 4}, num_key_value_heads=2, head_dim=16, global_head_dim=32, sliding_window=5,
        attention_k_eq_v=True, num_global_key_value_heads=1, num_kv_shared_layers=2,
        layer_types=["sliding_attention", "full_attention"] * 2,
    ),
    "llama4_text": lambda: Llama4TextConfig(  # chunked attention (chunks of 5) on rope layers, NoPE full layers
        **{**COMMON, "num_hidden_layers": 4}, num_key_value_heads=2, head_dim=16, intermediate_size_mlp=128,
        num_local_experts=2, num_experts_per_tok=1, attention_chunk_size=5, floor_scale=24, attn_scale=0.5,
    ),
    "jetmoe": lambda: JetMoeConfig(**COMMON, num_key_value_heads=2, kv_channels=16, num_local_experts=4,
                                   num_experts_per_tok=2),
    "mpt": lambda: MptConfig(vocab_size=VOCAB, d_model=64, n_heads=4, n_layers=2, max_seq_len=512,
                             initializer_range=0.2, pad_token_id=0, bos_token_id=1, eos_token_id=2),
    "deepseek_v3": lambda: DeepseekV3Config(  # multi-head latent attention: the cache holds latents
        **COMMON, num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=16,
        v_head_dim=16, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, first_k_dense_replace=1,
        n_group=1, topk_group=1,
    ),
    "gpt2": lambda: GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=512,
                               initializer_range=0.2, bos_token_id=1, eos_token_id=2, pad_token_id=0),
}

# What each architecture adds to the paged path beyond plain causal GQA (docs/supported.md lists it).
FEATURES = {"deepseek_v3": "multi-head latent attention (latents cached)", "gpt_oss": "attention sinks", "granite_swa": "attention sinks", "falcon": "parallel attention/MLP",
            "mixtral": "mixture of experts", "phi": "partial rotary",
            "gemma4_text": "per-layer head dims and KV heads, K = V on full layers, last 2 layers share KV",
            "mpt": "ALiBi, use_cache off in its config",
            "jetmoe": "mixture of attention heads (K/V heads tiled over the experts)",
            "llama4_text": "chunked attention (5), NoPE layers' temperature tuning from 24 positions"}

_CACHE = {}


def tiny_model(arch: str = "llama", seed: int = 0):
    """A small random model of `arch`, fp32, eval mode (cached per process; do not mutate it)."""
    key = (arch, seed)
    if key not in _CACHE:
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(CONFIGS[arch]())
        _CACHE[key] = model.eval()
    return _CACHE[key]


def ragged_batch(lengths, seed: int = 0, pad_token_id: int = 0):
    """Left-padded input_ids / attention_mask for prompts of the given lengths (tokens in [3, VOCAB))."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(lengths), width), dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, width - n :] = torch.randint(3, VOCAB, (n,), generator=g)
        mask[row, width - n :] = 1
    return ids, mask


CHAT_TEMPLATE = (
    "{% for m in messages %}<s> {{ m['role'] }} : {{ m['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}<s> assistant : {% endif %}"
)


def tiny_tokenizer():
    """A word-level tokenizer over VOCAB ids: <pad>=0, <s>=1, </s>=2, then words w3 .. w95; left padding."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if "tokenizer" not in _CACHE:
        vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
        vocab["user"], vocab["assistant"], vocab["system"], vocab[":"] = 3, 4, 5, 6
        vocab = {word: i for word, i in vocab.items() if word not in ("w3", "w4", "w5", "w6")}
        backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
        backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>",
                                      eos_token="</s>", unk_token="<pad>", padding_side="left")
        tok.chat_template = CHAT_TEMPLATE
        _CACHE["tokenizer"] = tok
    return _CACHE["tokenizer"]
