"""`posttrain init-model`: randomly initialised Hugging Face checkpoints made on this machine.

The checkpoint is an ordinary transformers model directory (config.json, model.safetensors,
tokenizer files with a chat template), so everything downstream loads it through the same
`from_pretrained` path as a user's checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

from posttrain.models.tokenizer import build_tokenizer

# Sizes: tiny ~1.1M parameters (tests, demo), small ~28M (benchmarks).
PRESETS: dict[str, dict] = {
    "tiny": dict(
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=512,
        max_position_embeddings=512,
    ),
    "small": dict(
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=8,
        vocab_size=2048,
        max_position_embeddings=1024,
    ),
}

# Mixture-of-experts architectures get small expert MLPs so the tiny preset stays tiny.
MOE_OVERRIDES: dict[str, dict] = {
    "qwen3_moe": dict(
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=128,
        decoder_sparse_step=1,
        output_router_logits=False,
        head_dim=32,
    ),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
}
ARCHES = ("llama", "qwen3", "qwen3_moe", "mixtral")


def model_config(preset: str, arch: str, tokenizer) -> AutoConfig:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}: expected one of {sorted(PRESETS)}")
    if arch not in ARCHES:
        raise ValueError(f"unknown arch {arch!r}: expected one of {list(ARCHES)}")
    fields = dict(PRESETS[preset])
    fields["vocab_size"] = len(tokenizer)
    fields.update(MOE_OVERRIDES.get(arch, {}))
    if arch.startswith("qwen3"):
        fields.setdefault("head_dim", fields["hidden_size"] // fields["num_attention_heads"])
    return AutoConfig.for_model(
        arch,
        **fields,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        rms_norm_eps=1e-6,
        initializer_range=0.02,
    )


def init_model(out: str | Path, preset: str = "tiny", arch: str = "llama", seed: int = 0) -> Path:
    """Create and save a random model plus tokenizer in `out`; returns the directory."""
    out = Path(out)
    tokenizer = build_tokenizer(vocab_size=PRESETS.get(preset, {}).get("vocab_size", 512))
    config = model_config(preset, arch, tokenizer)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    )
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)  # safetensors by default
    tokenizer.save_pretrained(out)
    return out


def count_parameters(model: torch.nn.Module) -> int:
    # Tied embeddings are one tensor, so count unique storages.
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel()
    return total
