"""Loading real families' checkpoints: attention kernels a model cannot use are one-line
errors naming the values that work, dtype choices are announced, LoRA adapters record an
absolute base path, and chat-format RL prompts are checked at start-up."""

from __future__ import annotations

import json

import pytest
import torch
from arch_models import build_family

from posttrain.config import LoraConfig, ModelConfig
from posttrain.data.encoding import check_prompts
from posttrain.data.loading import DataError
from posttrain.models.loading import ModelError, apply_lora, load_causal_lm


@pytest.fixture(scope="module")
def tok():
    from posttrain.models.tokenizer import build_tokenizer

    return build_tokenizer(vocab_size=512)


def test_gemma2_on_sdpa_is_a_one_line_error_naming_what_works(tmp_path, tok):
    path = build_family("gemma2-softcap", tmp_path / "g2", tok)
    with pytest.raises(ModelError) as err:
        load_causal_lm(ModelConfig(name_or_path=str(path), attn_implementation="sdpa"))
    msg = str(err.value)
    assert "\n" not in msg and "soft-capping" in msg and "values that work: eager" in msg
    load_causal_lm(ModelConfig(name_or_path=str(path), attn_implementation="eager"))


def test_flash_attention_without_the_package_is_a_one_line_error(tiny_model_dir):
    try:
        import flash_attn  # noqa: F401

        pytest.skip("flash-attn is installed here")
    except ImportError:
        pass
    cfg = ModelConfig(name_or_path=str(tiny_model_dir), attn_implementation="flash_attention_2")
    with pytest.raises(
        ModelError, match=r"attn_implementation=flash_attention_2.*values that work: sdpa, eager"
    ):
        load_causal_lm(cfg)


def test_bf16_checkpoint_keeps_float32_master_weights_with_a_notice(tmp_path, tok, capsys):
    path = build_family("llama", tmp_path / "l", tok)
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).save_pretrained(path)
    model = load_causal_lm(ModelConfig(name_or_path=str(path)))
    assert next(model.parameters()).dtype == torch.float32
    assert "stored in bfloat16; training keeps float32 master weights" in capsys.readouterr().out
    pure = load_causal_lm(ModelConfig(name_or_path=str(path), dtype="bfloat16"))
    assert next(pure.parameters()).dtype == torch.bfloat16
    assert "pure bfloat16 training" in capsys.readouterr().out


def test_lora_adapter_records_the_absolute_base_path(tmp_path, tiny_model_dir, monkeypatch):
    import shutil

    shutil.copytree(tiny_model_dir, tmp_path / "base")
    monkeypatch.chdir(tmp_path)
    model = load_causal_lm(ModelConfig(name_or_path="./base"))
    lora = apply_lora(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    lora.save_pretrained(tmp_path / "adapter")
    base = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert base["base_model_name_or_path"] == str((tmp_path / "base").resolve())


def test_chat_prompts_with_a_template_less_tokenizer_fail_at_start_up():
    from posttrain.models.tokenizer import build_tokenizer

    plain = build_tokenizer(vocab_size=512)
    plain.chat_template = None
    check_prompts(plain, ["a plain string prompt"], "p.jsonl")
    with pytest.raises(DataError, match=r"p\.jsonl: row 2: .*no chat template"):
        check_prompts(plain, ["ok", [{"role": "user", "content": "hi"}]], "p.jsonl")
    chat = build_tokenizer(vocab_size=512)
    with pytest.raises(DataError, match=r"p\.jsonl: row 1: message 0 has unknown role 'robot'"):
        check_prompts(chat, [[{"role": "robot", "content": "hi"}]], "p.jsonl")
