"""Tiny random-weight checkpoints of the common Hugging Face families, built from each family's
own transformers config class and saved with save_pretrained (a few hundred KB each), so the
architecture matrix loads them exactly as a user's checkpoint: from a directory.

Sliding windows are 16 tokens, shorter than the test sequences, so a fast path that ignored
them would give different numbers (real Gemma windows are 512-4096 tokens, and GRPO group rows
are longer than that).
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

WINDOW = 16
_COMMON = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
_GQA = dict(_COMMON, num_key_value_heads=2, max_position_embeddings=4096)
_SW = ["sliding_attention", "full_attention"]

# family -> (config class, model class, kwargs, attn_implementation)
FAMILIES: dict[str, tuple[str, str, dict, str]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(_GQA, tie_word_embeddings=False), "sdpa"),
    "llama-tied": ("LlamaConfig", "LlamaForCausalLM", dict(_GQA, tie_word_embeddings=True), "sdpa"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(_GQA, tie_word_embeddings=True), "sdpa"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(_GQA, head_dim=8), "sdpa"),
    "mistral-window": (
        "MistralConfig",
        "MistralForCausalLM",
        dict(_GQA, sliding_window=WINDOW),
        "sdpa",
    ),
    "gemma2-softcap": (
        "Gemma2Config",
        "Gemma2ForCausalLM",
        dict(
            _GQA,
            head_dim=8,
            sliding_window=WINDOW,
            layer_types=_SW,
            attn_logit_softcapping=20.0,
            final_logit_softcapping=10.0,
        ),
        "eager",  # sdpa cannot soft-cap (transformers refuses it)
    ),
    "gemma3-window": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        dict(_GQA, head_dim=8, sliding_window=WINDOW, layer_types=_SW),
        "sdpa",
    ),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(_GQA, pad_token_id=0), "sdpa"),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", dict(_GQA), "sdpa"),
    "gpt-neox": (
        "GPTNeoXConfig",
        "GPTNeoXForCausalLM",
        dict(_COMMON, max_position_embeddings=4096),
        "sdpa",
    ),
    "gpt2": (
        "GPT2Config",
        "GPT2LMHeadModel",
        dict(n_embd=32, n_layer=2, n_head=4, n_positions=4096),
        "sdpa",
    ),
    "opt": (
        "OPTConfig",
        "OPTForCausalLM",
        dict(
            hidden_size=32,
            ffn_dim=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            word_embed_proj_dim=32,
            max_position_embeddings=4096,
        ),
        "sdpa",
    ),
    "mixtral": (
        "MixtralConfig",
        "MixtralForCausalLM",
        dict(_GQA, num_local_experts=4, num_experts_per_tok=2),
        "sdpa",
    ),
    "qwen3-moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        dict(_GQA, head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32),
        "sdpa",
    ),
}


def build_family(family: str, out: Path, tokenizer) -> Path:
    """Save a random tiny `family` model and `tokenizer` to `out`; returns `out`."""
    config_name, model_name, kwargs, attn = FAMILIES[family]
    config = getattr(transformers, config_name)(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **{"pad_token_id": tokenizer.pad_token_id, **kwargs},
    )
    torch.manual_seed(0)
    model = getattr(transformers, model_name)(config)
    # Random init gives near-uniform logits; larger weights make the equalities meaningful.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.15)
    model.config._attn_implementation_internal = None  # let the loader choose, as a user's
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "posttrain_attn.txt").write_text(attn)
    return out


def attn_of(path: Path) -> str:
    return (Path(path) / "posttrain_attn.txt").read_text()
