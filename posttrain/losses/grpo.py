"""GRPO and its variants (spec §7): group-relative advantages and the clipped policy loss.

GRPO: Shao et al. 2024 (DeepSeekMath), eq. 3 and §4.1.2 (outcome supervision).
Dr. GRPO: Liu et al. 2025 ("Understanding R1-Zero-like training"), eq. 2: no std division in
the advantage (`group_advantages(scale="none")`) and a constant normaliser G·L_max.
DAPO: Yu et al. 2025, eq. 8 (token-level loss, clip-higher ε_high > ε_low) and eq. 13 (soft
overlong punishment).

Per token, ℓ = min(ρ Â, clip(ρ, 1-ε_low, 1+ε_high) Â) - β·KL_k3 with ρ = π_θ/π_old. The three
aggregations differ only in what the summed -ℓ is divided by, which is exactly `units`:

- grpo:    per-sequence token mean, summed over sequences     units = N sequences
- dr_grpo: sum over every completion token                    units = N · max_completion_length
- dapo:    sum over every completion token                    units = Σ_i |o_i|

so `total / units` summed over micro-batches and divided by the global units is the paper's loss
for the whole batch. With one optimisation step per rollout, pass old_logprobs =
logprobs.detach(): ρ = 1 in value while the gradient still flows.
"""

from __future__ import annotations

import torch

from posttrain.losses.common import clip_metrics, masked_sum
from posttrain.losses.types import LossOutput

GRPO_LOSS_TYPES = ("grpo", "dr_grpo", "dapo")
ADVANTAGE_SCALES = ("group", "batch", "none")


def group_advantages(
    rewards: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-4
) -> torch.Tensor:
    """Â_i = (r_i - mean of its group) / (std + eps). rewards: (N,) -> (N,).

    Rows [g*G:(g+1)*G] are one prompt's group. `scale`: "group" divides by the group's std
    (GRPO), "batch" by the std of all N rewards (TRL `scale_rewards="batch"`), "none" not at all
    (Dr. GRPO). std is torch.std's default UNBIASED estimate (divides by G-1), as in TRL. A group
    whose rewards are all equal gets exactly zero advantage (also for G = 1).
    """
    if scale not in ADVANTAGE_SCALES:
        raise ValueError(f"scale must be one of {ADVANTAGE_SCALES}, got {scale!r}")
    if rewards.ndim != 1 or rewards.shape[0] % group_size != 0:
        raise ValueError(
            f"rewards must be (N,) with N divisible by group_size={group_size}, "
            f"got shape {tuple(rewards.shape)}"
        )
    grouped = rewards.float().view(-1, group_size)  # (N/G, G)
    centred = grouped - grouped.mean(dim=1, keepdim=True)  # (N/G, G)
    # G = 1 (or N = 1 for "batch") has no spread to divide by; the all-equal rule zeroes it
    if scale == "group" and group_size > 1:
        centred = centred / (grouped.std(dim=1, keepdim=True) + eps)
    elif scale == "batch" and grouped.numel() > 1:
        centred = centred / (grouped.std() + eps)
    all_equal = grouped.amax(dim=1, keepdim=True) == grouped.amin(dim=1, keepdim=True)
    return centred.masked_fill(all_equal, 0.0).reshape(-1)  # (N,)


def k3_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(π_θ || π_ref) per token: π_ref/π_θ - log(π_ref/π_θ) - 1 ≥ 0."""
    log_ratio = ref_logprobs - logprobs
    return torch.exp(log_ratio) - log_ratio - 1.0


def grpo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    completion_mask: torch.Tensor,
    loss_type: str,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    beta: float = 0.0,
    ref_logprobs: torch.Tensor | None = None,
    max_completion_length: int | None = None,
    token_weights: torch.Tensor | None = None,
) -> LossOutput:
    """Clipped surrogate with `loss_type` aggregation (see module docstring).

    logprobs, old_logprobs, ref_logprobs, completion_mask: (N, T); advantages: (N,) or (N, T)
    (per-token, e.g. REINFORCE++). token_weights: (N, T) detached rollout-correction weights
    (TIS) multiplying each token's clipped term (not the KL term).
    Metrics (means over completion tokens): clip_fraction, clip_fraction_low (ρ < 1-ε_low with
    Â < 0), clip_fraction_high (ρ > 1+ε_high with Â > 0), ratio_mean, and kl (mean k3) whenever
    ref_logprobs is given.
    """
    if loss_type not in GRPO_LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {GRPO_LOSS_TYPES}, got {loss_type!r}")
    if beta != 0.0 and ref_logprobs is None:
        raise ValueError("beta > 0 needs ref_logprobs")
    if loss_type == "dr_grpo" and max_completion_length is None:
        raise ValueError("loss_type='dr_grpo' needs max_completion_length (L_max)")
    mask = completion_mask.bool()  # (N, T)
    adv = advantages.float()
    adv = adv.unsqueeze(1) if adv.ndim == 1 else adv  # (N, 1) or (N, T)
    ratio = torch.exp(logprobs.float() - old_logprobs.float())  # (N, T)
    clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)  # (N, T)
    objective = torch.minimum(ratio * adv, clipped * adv)  # (N, T) ℓ before the KL term
    if token_weights is not None:
        objective = objective * token_weights.float().detach()
    kl = None if ref_logprobs is None else k3_kl(logprobs.float(), ref_logprobs.float())
    if beta != 0.0:
        objective = objective - beta * kl
    token_loss = -objective  # (N, T)

    num_seqs = float(logprobs.shape[0])
    if loss_type == "grpo":
        seq_lengths = mask.sum(dim=1).clamp(min=1)  # (N,)
        total = (masked_sum(token_loss, mask, dim=1) / seq_lengths).sum()
        units = torch.tensor(num_seqs, device=logprobs.device)
    elif loss_type == "dr_grpo":
        total = masked_sum(token_loss, mask)
        units = torch.tensor(num_seqs * max_completion_length, device=logprobs.device)
    else:  # dapo
        total = masked_sum(token_loss, mask)
        units = mask.sum().float()

    metrics = clip_metrics(ratio, adv, eps_low, eps_high, mask, kl)
    return LossOutput(total=total, units=units, metrics=metrics)


def overlong_penalty(lengths: torch.Tensor, max_length: int, cache_length: int) -> torch.Tensor:
    """DAPO soft overlong punishment (eq. 13). lengths: (N,) -> (N,) float reward to add.

    0 if L <= L_max - L_cache; (L_max - L_cache - L) / L_cache if L_max - L_cache < L <= L_max;
    -1 if L > L_max.
    """
    safe = max_length - cache_length
    lengths = lengths.float()
    ramp = (safe - lengths) / cache_length  # (N,) in [-1, 0) on the ramp
    penalty = torch.where(lengths <= safe, torch.zeros_like(lengths), ramp)
    return torch.where(lengths > max_length, torch.full_like(lengths, -1.0), penalty)
