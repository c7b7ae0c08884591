"""Loading models and tokenizers through transformers, LoRA through peft.

Everything goes through `from_pretrained`, so a local checkpoint made by `posttrain init-model`
and a user's checkpoint take the same path. `trust_remote_code` stays off unless the recipe
asks for it; weights are read and written as safetensors.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from posttrain.config import LoraConfig, ModelConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelError(ValueError):
    """A model or tokenizer that cannot be loaded; the message names the path."""


def check_model_path(name_or_path: str) -> None:
    if not name_or_path:
        raise ModelError("model.name_or_path is empty: give a model directory or hub id")
    p = Path(name_or_path)
    looks_local = (
        p.is_absolute() or name_or_path.startswith(".") or p.exists() or name_or_path.count("/") > 1
    )
    if looks_local:
        if not p.is_dir():
            raise ModelError(f"model path does not exist: {name_or_path}")
        if not (p / "config.json").is_file() and not (p / "adapter_config.json").is_file():
            raise ModelError(f"{name_or_path}: not a Hugging Face model directory (no config.json)")


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    check_model_path(name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        # Many causal LMs ship without a pad token; padding is always masked, so EOS serves.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _from_pretrained(auto_cls, cfg: ModelConfig, **extra):
    check_model_path(cfg.name_or_path)
    kwargs = dict(
        dtype=DTYPES[cfg.dtype],
        trust_remote_code=cfg.trust_remote_code,
        attn_implementation=cfg.attn_implementation,
        **extra,
    )
    if cfg.lora.load_in_4bit:
        kwargs["quantization_config"] = quantization_config(cfg.lora)
    try:
        model = auto_cls.from_pretrained(cfg.name_or_path, **kwargs)
    except OSError as e:
        raise ModelError(f"{cfg.name_or_path}: could not load the model: {e}") from None
    if cfg.moe.freeze_router:  # at load, before any optimizer or DDP wrapper sees the params
        from posttrain.models.moe import freeze_routers

        freeze_routers(model)
    return model


def load_causal_lm(cfg: ModelConfig):
    return _from_pretrained(AutoModelForCausalLM, cfg)


def load_sequence_classifier(cfg: ModelConfig, pad_token_id: int):
    """A scalar-head model (num_labels=1) on any causal-LM checkpoint; the head reads the last
    non-pad token, which transformers finds through config.pad_token_id."""
    model = _from_pretrained(AutoModelForSequenceClassification, cfg, num_labels=1)
    model.config.pad_token_id = pad_token_id
    return model


def quantization_config(lora: LoraConfig):
    if not torch.cuda.is_available():
        raise ModelError(
            "model.lora.load_in_4bit=true (QLoRA) needs a CUDA GPU and bitsandbytes; "
            "this machine has no GPU: set it to false"
        )
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError:
        raise ModelError(
            "model.lora.load_in_4bit=true needs bitsandbytes: pip install bitsandbytes"
        ) from None
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_use_double_quant=True,
    )


def apply_lora(model, lora: LoraConfig, task_type: str = "CAUSAL_LM"):
    """Wrap `model` in a peft LoRA adapter; only the adapter (and a score head) trains."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model, prepare_model_for_kbit_training

    if lora.load_in_4bit:
        model = prepare_model_for_kbit_training(model)
    peft_config = PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        task_type=task_type,
    )
    return get_peft_model(model, peft_config)


def is_peft_model(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)
