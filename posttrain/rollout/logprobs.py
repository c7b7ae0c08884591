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
With the chunked LM head (models/lm_head.py, `model.logit_chunk_tokens`) no (N, C, V) logits
exist at all: the forward returns hidden states and posttrain/losses/chunked_ce.py applies the
head to the masked-in completion positions a chunk at a time, in forward and backward.
"""

from __future__ import annotations

import torch
from torch import Tensor

from posttrain.losses.chunked_ce import chunked_token_logprobs
from posttrain.models import attention_support
from posttrain.models.forward_cost import shared_prompt_saves_work
from posttrain.models.lm_head import (
    HeadPlan,
    accepts_logits_to_keep,
    final_hidden,
    head_function,
    plan_of,
)
from posttrain.utils import position_ids_from_mask

__all__ = ["accepts_logits_to_keep", "sequence_logprobs", "shares_prompts"]


def last_outputs(model, keep: int, plan: HeadPlan | None, input_ids, **kwargs) -> Tensor:
    """(B, >= keep, D) outputs whose last `keep` columns are wanted: logits (D = V), or with a
    chunked-head plan the final hidden states (D = H) that the LM head would read."""
    if plan is not None:
        return final_hidden(model, input_ids, **kwargs)
    extra = {"logits_to_keep": keep} if accepts_logits_to_keep(model) else {}
    return model(input_ids=input_ids, use_cache=False, **extra, **kwargs).logits


def completion_logits(
    model, prompt_ids, prompt_mask, completion_ids, completion_mask, plan=None
) -> Tensor:
    """(N, C, V) logits predicting each completion token, one [prompt; completion] row each
    (with a chunked-head plan: the (N, C, H) hidden states instead)."""
    width = completion_ids.shape[1]  # C
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)  # (N, P + C)
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1).long()  # (N, P + C)
    logits = last_outputs(
        model,
        width + 1,
        plan,
        input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
    )
    # The logit at position t predicts token t + 1: the last prompt position predicts the first
    # completion token, and the last position predicts nothing.
    return logits[:, -(width + 1) : -1]  # (N, C, V)


def shares_prompts(prompt_ids: Tensor, prompt_mask: Tensor, group_size: int) -> bool:
    """Whether rows [kG, (k+1)G) hold one prompt each."""
    n = prompt_ids.shape[0]
    if n % group_size:
        return False
    ids = prompt_ids.view(n // group_size, group_size, -1)
    masks = prompt_mask.view(n // group_size, group_size, -1)
    return bool((ids == ids[:, :1]).all() and (masks == masks[:, :1]).all())


def shared_prompt_logits(
    model, prompt_ids, prompt_mask, completion_ids, group_size, plan=None
) -> Tensor:
    """The (N, C, V) logits (or hidden states) of `completion_logits` with each prompt run
    once per group.

    A group becomes one row [prompt (P, left-padded) | c_1 (C) | ... | c_G (C)] with a 4-D mask
    in which completion j sees the prompt's real tokens and its own earlier tokens only, and
    positions that continue the prompt's in every completion: each completion token's hidden
    state is the one it has in its own row, for G·(P + C) - (P + G·C) fewer tokens per group.
    Needs an attention that reads a 4-D mask (attention_support.custom_mask).
    """
    n, width = completion_ids.shape  # N, C
    groups, P, G = n // group_size, prompt_ids.shape[1], group_size
    device = prompt_ids.device
    first = torch.arange(groups, device=device) * G
    p_ids, p_mask = prompt_ids[first], prompt_mask[first].bool()  # (g, P)
    input_ids = torch.cat([p_ids, completion_ids.reshape(groups, G * width)], dim=1)  # (g, W)
    W = P + G * width

    # Segment of every column: 0 = prompt, j + 1 = completion j; and order within the row.
    col = torch.arange(W, device=device)
    segment = torch.where(col < P, 0, (col - P) // width + 1)  # (W,)
    causal = col[None, :] <= col[:, None]  # (W, W) key <= query
    same_completion = (segment[None, :] == segment[:, None]) & (segment[:, None] > 0)
    no_completion = p_mask.new_zeros(groups, G * width)
    real_prompt_key = torch.cat([p_mask, no_completion], dim=1)[:, None, :]  # (g, 1, W)
    mask = (real_prompt_key | same_completion) & causal  # (g, W, W)
    pad_queries = torch.cat([~p_mask, no_completion], dim=1)  # (g, W)
    mask = mask | (torch.eye(W, dtype=torch.bool, device=device) & pad_queries[:, :, None])

    prompt_len = p_mask.sum(-1, keepdim=True)  # (g, 1)
    prompt_pos = (p_mask.long().cumsum(-1) - 1).clamp(min=0)  # (g, P)
    completion_pos = prompt_len + torch.arange(width, device=device).repeat(G)  # (g, G*C)
    position_ids = torch.cat([prompt_pos, completion_pos], dim=1)

    # Only columns P - 1 .. W - 1 predict completion tokens: the LM head skips the prompt.
    keep = G * width + 1
    # Sliding windows are applied on positions, per layer type (attention_support.model_mask).
    model_mask = attention_support.model_mask(attention_support.profile(model), mask, position_ids)
    logits = last_outputs(
        model, keep, plan, input_ids, attention_mask=model_mask, position_ids=position_ids
    )[:, -keep:]  # (g, G*C + 1, V): column P - 1 + k is index k
    # Token t of completion j is predicted at column P + j*C + t - 1, the first one by the
    # prompt's last column (P - 1: prompts are left-padded).
    t = torch.arange(width, device=device)
    j = torch.arange(G, device=device)
    predictor = torch.where(t[None, :] == 0, 0, 1 + j[:, None] * width + t[None, :] - 1)
    return logits[:, predictor.reshape(-1)].reshape(n, width, -1)  # (N, C, V)


def sequence_logprobs(
    model,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    completion_ids: Tensor,
    completion_mask: Tensor,
    temperature: float = 1.0,
    return_entropy: bool = False,
    group_size: int = 1,
) -> Tensor | tuple[Tensor, Tensor]:
    """Log-probs (N, C) float32 of `completion_ids` under softmax(logits / T), 0 where
    `completion_mask` is 0. With return_entropy, also the (N, C) entropy of that distribution.

    prompt_ids / prompt_mask: (N, P) left-padded; completion_ids / completion_mask: (N, C)
    right-padded, as in `RolloutBatch`. temperature 0 (greedy sampling) is scored at T = 1.
    group_size G > 1: rows come in runs of G sharing one prompt (n samples per prompt), so each
    prompt is run once for its G completions (`shared_prompt_logits`); same numbers, fewer
    tokens. Falls back to one row per sample when the rows do not share their prompts, the
    model's attention cannot be given a custom mask (trainers say so at start-up), or the
    shared row would cost more (its attention grows with (P + G·C)²; models/forward_cost.py).
    """
    plan = plan_of(model)
    if (
        group_size > 1
        and attention_support.custom_mask(attention_support.profile(model)) is None
        and shares_prompts(prompt_ids, prompt_mask, group_size)
        # long completions after a short prompt: G plain rows attend over fewer pairs
        and shared_prompt_saves_work(
            model, prompt_ids.shape[1], completion_ids.shape[1], group_size
        )
    ):
        logits = shared_prompt_logits(
            model, prompt_ids, prompt_mask, completion_ids, group_size, plan
        )
    else:
        logits = completion_logits(
            model, prompt_ids, prompt_mask, completion_ids, completion_mask, plan
        )
    scale = temperature if temperature > 0 else 1.0
    if plan is not None:  # logits is (N, C, H) hidden states: the head runs on kept tokens only
        return _chunked(model, plan, logits, completion_ids, completion_mask, scale, return_entropy)

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


def _chunked(model, plan, hidden, completion_ids, completion_mask, scale, return_entropy):
    """`sequence_logprobs` from (N, C, H) hidden states through the chunked LM head."""
    keep = completion_mask.bool()  # (N, C)
    out = chunked_token_logprobs(
        hidden[keep],
        head_function(model, plan),
        completion_ids[keep],
        plan.chunk,
        scale,
        return_entropy,
    )  # (M,) each, M = kept tokens
    parts = out if return_entropy else (out,)
    full = []
    for part in parts:
        # masked_scatter keeps the gradient of the kept tokens; padding stays exactly 0
        full.append(part.new_zeros(keep.shape).masked_scatter(keep, part))
    return (full[0], full[1]) if return_entropy else full[0]
