"""Loading models and tokenizers through transformers, LoRA through peft.

Everything goes through `from_pretrained`, so a local checkpoint made by `posttrain init-model`
and a user's checkpoint take the same path. `trust_remote_code` stays off unless the recipe
asks for it; weights are read and written as safetensors.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
)

from posttrain import hub
from posttrain.config import LoraConfig, ModelConfig
from posttrain.errors import UserError, one_line

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelError(UserError, ValueError):
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
    else:  # a hub id: fail in one line now rather than after a minute of retries
        hub.require_hub(name_or_path, "model directory", ModelError)


def check_flash_attention(cfg: ModelConfig, auto_cls) -> None:
    """flash_attention_2 needs the flash-attn package and a CUDA GPU: say so in one line, with
    the pip command, before transformers raises from deep inside from_pretrained."""
    if cfg.attn_implementation != "flash_attention_2":
        return
    if importlib.util.find_spec("flash_attn") is None:
        problem = "needs the flash-attn package, which is not installed: pip install flash-attn"
    elif not torch.cuda.is_available():
        problem = "needs a CUDA GPU, and this machine has none"
    else:
        return
    works = working_implementations(model_cls_of(auto_cls, resolved_path(cfg.name_or_path)))
    raise ModelError(
        f"model.attn_implementation=flash_attention_2 {problem}; values that work: "
        f"{', '.join(w for w in works if not w.startswith('flash'))}"
    )


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    check_model_path(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except OSError as e:  # e.g. a hub id that is not in the cache (offline) or does not exist
        raise ModelError(
            f"{name_or_path}: could not load the tokenizer: {one_line(str(e))}{hub.offline_hint()}"
        ) from None
    if tokenizer.pad_token_id is None:
        # Many causal LMs ship without a pad token; padding is always masked, so EOS serves.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def notice(message: str) -> None:
    """A start-up line, printed once (by the first process of a node)."""
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        print(f"note: {message}", flush=True)


def resolved_path(name_or_path: str) -> str:
    """A local checkpoint as an absolute path (LoRA adapters record the path they were trained
    from, and a relative one breaks from any other directory); a hub id as given."""
    p = Path(name_or_path).expanduser()
    return str(p.resolve()) if p.is_dir() else name_or_path


def working_implementations(model_class) -> list[str]:
    """model.attn_implementation values the model class supports (eager always does)."""
    works = ["eager"]
    if getattr(model_class, "_supports_sdpa", False):
        works.insert(0, "sdpa")
    if getattr(model_class, "_supports_flash_attn", False):
        works.append("flash_attention_2 (with flash-attn installed and a CUDA GPU)")
    return works


def model_cls_of(auto_cls, name: str):
    try:
        return auto_cls._model_mapping[type(AutoConfig.from_pretrained(name))]
    except Exception:  # any failure: no class to name, the generic list is used
        return None


def check_attention(config, auto_cls, cfg: ModelConfig) -> None:
    """A one-line error, before any weights load, for an attention kernel the model cannot use."""
    try:
        model_class = auto_cls._model_mapping[type(config)]
    except KeyError:
        return  # custom code or an unknown mapping: transformers decides
    works = working_implementations(model_class)
    impl = cfg.attn_implementation
    if getattr(config, "attn_logit_softcapping", None) and impl == "sdpa":
        works = [w for w in works if w != "sdpa"]
        raise ModelError(
            f"model.attn_implementation=sdpa cannot apply {config.model_type}'s attention "
            f"soft-capping; values that work: {', '.join(works)}"
        )
    if impl != "eager" and not any(w.startswith(impl) for w in works):
        raise ModelError(
            f"model.attn_implementation={impl} is not supported by {model_class.__name__}; "
            f"values that work: {', '.join(works)}"
        )


def dtype_notices(config, cfg: ModelConfig) -> None:
    stored = getattr(config, "dtype", None)
    stored = str(stored).removeprefix("torch.") if stored is not None else None
    if cfg.dtype != "float32":
        notice(
            f"model.dtype={cfg.dtype}: pure {cfg.dtype} training, no float32 master weights "
            "(small updates may round away); the default float32 keeps them"
        )
    elif stored in ("bfloat16", "float16"):
        notice(
            f"the checkpoint is stored in {stored}; training keeps float32 master weights "
            f"(train.mixed_precision=bf16 computes in bf16, model.dtype={stored} is pure {stored})"
        )


def _from_pretrained(auto_cls, cfg: ModelConfig, **extra):
    check_model_path(cfg.name_or_path)
    check_flash_attention(cfg, auto_cls)
    name = resolved_path(cfg.name_or_path)
    adapter_only = (Path(name) / "adapter_config.json").is_file() and not (
        Path(name) / "config.json"
    ).is_file()
    if not adapter_only:  # an adapter directory's base config is read by peft
        try:
            config = AutoConfig.from_pretrained(name, trust_remote_code=cfg.trust_remote_code)
        except (OSError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            if "trust_remote_code" in str(e) or "custom code" in str(e):
                raise ModelError(
                    f"{cfg.name_or_path}: the checkpoint needs its own code (auto_map), which "
                    "posttrain does not run unless asked: set model.trust_remote_code=true if you "
                    "trust it"
                ) from None
            raise ModelError(
                f"{cfg.name_or_path}: could not read the model config: {first}"
            ) from None
        check_attention(config, auto_cls, cfg)
        dtype_notices(config, cfg)
    kwargs = dict(
        dtype=DTYPES[cfg.dtype],
        trust_remote_code=cfg.trust_remote_code,
        attn_implementation=cfg.attn_implementation,
        **extra,
    )
    if cfg.lora.load_in_4bit:
        kwargs["quantization_config"] = quantization_config(cfg.lora)
    try:
        model = auto_cls.from_pretrained(name, **kwargs)
    except OSError as e:
        raise ModelError(
            f"{cfg.name_or_path}: could not load the model: {one_line(str(e))}{hub.offline_hint()}"
        ) from None
    except (ValueError, ImportError) as e:  # e.g. flash_attention_2 without flash-attn
        text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "attn" not in text.lower() and "attention" not in text.lower():
            raise
        works = working_implementations(model_cls_of(auto_cls, name))
        raise ModelError(
            f"model.attn_implementation={cfg.attn_implementation}: {text}; "
            f"values that work: {', '.join(works)}"
        ) from None
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
