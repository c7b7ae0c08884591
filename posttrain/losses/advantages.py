"""Critic-free advantage estimators (spec §7, §13), selected by `grpo.advantage`.

- group: GRPO's group-normalised reward (losses/grpo.py `group_advantages`), one per sequence.
- rloo: REINFORCE Leave-One-Out, Kool et al. 2019 / Ahmadian et al. 2024 ("Back to Basics"),
  eq. 7: Â_i = r_i - (1/(G-1)) Σ_{j≠i} r_j = G/(G-1) · (r_i - mean(r)); no std division.
- reinforce_pp: REINFORCE++, Hu 2025, §3: no group baseline; per-token reward
  r_{i,t} = -β·k1_t (k1 = log π_old - log π_ref) plus r_i on the last completion token,
  return G_{i,t} = Σ_{s≥t} r_{i,s} (γ = 1, no critic), then normalised over every completion
  token of the global batch (mean / unbiased std, all prompts and all processes). Per token:
  (N, T).

All estimators share one signature so the trainer dispatches through
`ADVANTAGE_ESTIMATORS[cfg.advantage]`; an argument an estimator does not use is ignored.
`all_reduce` sums a tensor over processes (identity on one process), so the batch statistics
of reinforce_pp are global without this module knowing about torch.distributed.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from posttrain.losses.grpo import group_advantages


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def group_estimator(
    rewards: torch.Tensor,
    group_size: int,
    completion_mask: torch.Tensor | None = None,
    scale: str = "group",
    kl_coef: float = 0.0,
    logprobs: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    all_reduce: Callable[[torch.Tensor], torch.Tensor] = _identity,
) -> torch.Tensor:
    """GRPO's (r - group mean) / (std + eps): (N,) -> (N,) (see `group_advantages`)."""
    return group_advantages(rewards, group_size, scale)


def rloo_advantages(
    rewards: torch.Tensor,
    group_size: int,
    completion_mask: torch.Tensor | None = None,
    scale: str = "group",
    kl_coef: float = 0.0,
    logprobs: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    all_reduce: Callable[[torch.Tensor], torch.Tensor] = _identity,
) -> torch.Tensor:
    """Â_i = r_i - mean of the other G-1 rewards of its group: (N,) -> (N,). Needs G >= 2."""
    if group_size < 2:
        raise ValueError("rloo needs group_size >= 2 (the baseline is the other samples' mean)")
    if rewards.ndim != 1 or rewards.shape[0] % group_size != 0:
        raise ValueError(
            f"rewards must be (N,) with N divisible by group_size={group_size}, "
            f"got shape {tuple(rewards.shape)}"
        )
    grouped = rewards.float().view(-1, group_size)  # (N/G, G)
    others = (grouped.sum(dim=1, keepdim=True) - grouped) / (group_size - 1)  # (N/G, G)
    return (grouped - others).reshape(-1)


def reinforce_pp_advantages(
    rewards: torch.Tensor,
    group_size: int,
    completion_mask: torch.Tensor | None = None,
    scale: str = "group",
    kl_coef: float = 0.0,
    logprobs: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    all_reduce: Callable[[torch.Tensor], torch.Tensor] = _identity,
    eps: float = 1e-8,
) -> torch.Tensor:
    """REINFORCE++ token advantages: (N,) rewards, (N, T) mask -> (N, T), 0 outside the mask.

    kl_coef > 0 needs logprobs (π_old of the sampled tokens) and ref_logprobs, both (N, T).
    """
    if completion_mask is None:
        raise ValueError("reinforce_pp needs completion_mask (N, T)")
    mask = completion_mask.bool()  # (N, T)
    token_rewards = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    if kl_coef != 0.0:
        if logprobs is None or ref_logprobs is None:
            raise ValueError("reinforce_pp with kl_coef > 0 needs logprobs and ref_logprobs")
        k1 = logprobs.float() - ref_logprobs.float()  # (N, T)
        token_rewards = token_rewards - kl_coef * k1.masked_fill(~mask, 0.0)
    # the outcome reward sits on each sequence's last loss token (none if fully masked)
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    last = positions.masked_fill(~mask, -1).amax(dim=1)  # (N,)
    has_tokens = last >= 0
    rows = torch.nonzero(has_tokens).squeeze(1)
    token_rewards[rows, last[rows]] += rewards.float().to(mask.device)[rows]
    # return with γ = 1: reverse cumulative sum over the completion
    returns = token_rewards.flip(1).cumsum(1).flip(1).masked_fill(~mask, 0.0)  # (N, T)
    count = all_reduce(mask.sum().float())
    mean = all_reduce(returns.sum()) / count.clamp(min=1)
    squares = all_reduce(((returns - mean) ** 2).masked_fill(~mask, 0.0).sum())
    var = squares / (count - 1).clamp(min=1)  # unbiased, as masked_whiten
    return ((returns - mean) * torch.rsqrt(var + eps)).masked_fill(~mask, 0.0)


ADVANTAGE_ESTIMATORS: dict[str, Callable[..., torch.Tensor]] = {
    "group": group_estimator,
    "rloo": rloo_advantages,
    "reinforce_pp": reinforce_pp_advantages,
}
