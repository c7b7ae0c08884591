"""Teacher-forced log-probs of completion tokens (spec section 12).

One forward pass over [prompt; completion] gives log softmax(logits / T) of every completion
token, at the same temperature T used for sampling, with the attention mask and position ids
the rollout engine used (left-padded prompt, positions counted over real tokens only), so a
recomputation of π_old matches the sampling-time log-probs to float precision.

Memory: only the last C + 1 positions go through the LM head (`logits_to_keep`), and the
float32 upcast, temperature scaling and log-softmax run one row at a time (as TRL's
`selective_log_softmax`), so no second (N, C, V) temporary exists at once; without grad only
(C, V) scratch is used on top of the logits. Gradients flow (no inference mode inside):
trainers call this with grad enabled for π_θ and under `torch.no_grad()` for π_old / π_ref.
"""

from __future__ import annotations

import inspect

import torch
from torch import Tensor


def unwrap_model(model):
    """The Hugging Face model under DDP / torch.compile / peft wrappers (for introspection only)."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        if hasattr(model, "module"):  # DistributedDataParallel, accelerate wrappers
            model = model.module
        elif hasattr(model, "_orig_mod"):  # torch.compile
            model = model._orig_mod
        elif hasattr(model, "get_base_model"):  # peft
            model = model.get_base_model()
    return model


def accepts_logits_to_keep(model) -> bool:
    """Whether the causal LM can skip the LM head on positions we do not need."""
    try:
        return "logits_to_keep" in inspect.signature(unwrap_model(model).forward).parameters
    except (TypeError, ValueError):
        return False


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """(B, T) positions that count real tokens only, so a left-padded row is numbered exactly as
    the same row without padding; padding gets position 0 (it is masked anyway)."""
    return (attention_mask.long().cumsum(dim=-1) - 1).clamp(min=0)


def sequence_logprobs(
    model,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    completion_ids: Tensor,
    completion_mask: Tensor,
    temperature: float = 1.0,
    return_entropy: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Log-probs (N, C) float32 of `completion_ids` under softmax(logits / T), 0 where
    `completion_mask` is 0. With return_entropy, also the (N, C) entropy of that distribution.

    prompt_ids / prompt_mask: (N, P) left-padded; completion_ids / completion_mask: (N, C)
    right-padded, as in `RolloutBatch`. temperature 0 (greedy sampling) is scored at T = 1.
    """
    width = completion_ids.shape[1]  # C
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)  # (N, P + C)
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1).long()  # (N, P + C)
    extra = {"logits_to_keep": width + 1} if accepts_logits_to_keep(model) else {}
    logits = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
        **extra,
    ).logits
    # The logit at position t predicts token t + 1: the last prompt position predicts the first
    # completion token, and the last position predicts nothing.
    logits = logits[:, -(width + 1) : -1]  # (N, C, V)
    scale = temperature if temperature > 0 else 1.0

    token_logprobs, entropies = [], []
    for row_logits, row_ids in zip(logits, completion_ids, strict=True):  # (C, V), (C,)
        row = row_logits.float()
        if scale != 1.0:
            row = row / scale
        if return_entropy:
            row_logp = row.log_softmax(dim=-1)  # (C, V)
            token_logprobs.append(row_logp.gather(-1, row_ids.unsqueeze(-1)).squeeze(-1))
            entropies.append(-(row_logp.exp() * row_logp).sum(dim=-1))
        else:
            picked = row.gather(-1, row_ids.unsqueeze(-1)).squeeze(-1)  # (C,)
            token_logprobs.append(picked - row.logsumexp(dim=-1))

    keep = completion_mask.bool()
    zero = torch.zeros((), device=logits.device)
    out = torch.where(keep, torch.stack(token_logprobs), zero)  # (N, C)
    if return_entropy:
        return out, torch.where(keep, torch.stack(entropies), zero)
    return out
