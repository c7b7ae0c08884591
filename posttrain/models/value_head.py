"""The PPO critic: a per-token scalar value head on a causal-LM backbone (spec §6).

The critic is `AutoModelForTokenClassification` with `num_labels=1`, chosen over a hand-made
`AutoModel + nn.Linear` module because transformers already provides everything a critic
needs for every architecture it knows:
- per-token outputs (B, T, 1) from the backbone's last hidden state through a `score` Linear;
- loading from a causal-LM checkpoint (the LM head is dropped, `score` is freshly initialised)
  AND from a reward model saved by `posttrain rm` (`AutoModelForSequenceClassification`, whose
  bias-free `score` head has the same name and shape, so it is loaded, not re-initialised: the
  critic starts out predicting the reward model's score at every position);
- save_pretrained / from_pretrained in safetensors, so `OUTPUT_DIR/critic` can seed another run
  (`ppo.critic_init: PATH`) and loads with plain transformers.

Two config overrides make the head a plain value head: `token_classification_bias=False` (the
reward model's head has no bias, and one layout for every init keeps checkpoints uniform) and
`classifier_dropout=0.0` (transformers' default 0.1 dropout would make V(s) in training differ
from V_old computed at rollout time, which the clipped value loss compares against).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor
from transformers import AutoConfig, AutoModelForTokenClassification

from posttrain.config import ModelConfig
from posttrain.models.loading import ModelError, _from_pretrained, apply_lora, check_model_path
from posttrain.utils import position_ids_from_mask


def load_critic(cfg_model: ModelConfig, path: str) -> torch.nn.Module:
    """A value model from any causal-LM, reward-model or critic checkpoint at `path`, with the
    dtype, attention kernel and LoRA settings of `cfg_model` (LoRA: the critic gets its own
    adapter; the value head is trained in full through peft's TOKEN_CLS modules_to_save)."""
    cfg = dataclasses.replace(cfg_model, name_or_path=path)
    check_model_path(path)
    config = AutoConfig.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    if type(config) not in AutoModelForTokenClassification._model_mapping:
        # e.g. Gemma 3 text, OLMo 2, OPT: transformers has no per-token head class for them
        raise ModelError(
            f"ppo: the critic is a token-classification model, which transformers does not "
            f"provide for {config.model_type} ({path}); use grpo (no critic) for this family"
        )
    config.num_labels = 1
    config.token_classification_bias = False  # not from_pretrained kwargs: set on the config
    config.classifier_dropout = 0.0
    critic = _from_pretrained(AutoModelForTokenClassification, cfg, config=config)
    if cfg_model.lora.r > 0:
        lora = cfg_model.lora
        if lora.target_modules == "all-linear":
            # peft's "all-linear" would also put an adapter on `score`, which TOKEN_CLS already
            # trains in full (modules_to_save): name the backbone's linear layers instead.
            names = {
                name.rsplit(".", 1)[-1]
                for name, module in critic.named_modules()
                if isinstance(module, torch.nn.Linear) and not name.startswith("score")
            }
            lora = dataclasses.replace(lora, target_modules=sorted(names))
        critic = apply_lora(critic, lora, task_type="TOKEN_CLS")
    return critic


def critic_values(
    critic,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    completion_ids: Tensor,
    completion_mask: Tensor,
) -> Tensor:
    """(N, C) float32 values V(s_t) of the states in which completion token t was chosen.

    Inputs are laid out as in `RolloutBatch` (left-padded prompt (N, P), right-padded
    completion (N, C)). The state before token t is everything up to position P + t - 1, so
    the values are read at positions P - 1 ... P + C - 2, the same positions whose logits give
    the token's log-prob in `sequence_logprobs`. 0 where `completion_mask` is 0.
    """
    width = completion_ids.shape[1]  # C
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)  # (N, P + C)
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1).long()  # (N, P + C)
    out = critic(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
    ).logits  # (N, P + C, 1)
    values = out[:, -(width + 1) : -1, 0].float()  # (N, C)
    return values.masked_fill(~completion_mask.bool(), 0.0)


def save_critic(critic, path, tokenizer=None, state_dict: dict | None = None) -> None:
    """Write the critic as a plain Hugging Face token-classification model (a LoRA critic is
    merged first; call this last, the merge modifies the model in place). `state_dict`: its
    full weights when gathered from shards."""
    if hasattr(critic, "merge_and_unload") and state_dict is None:
        critic = critic.merge_and_unload()
    critic.save_pretrained(path, safe_serialization=True, state_dict=state_dict)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
