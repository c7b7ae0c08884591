"""KTO: Ethayarajh et al. 2024 ("KTO: Model Alignment as Prospect Theoretic Optimization"),
eq. 8 (spec §14). Unpaired rows (x, y, desirable ∈ {0, 1}).

    h = β · (log π_θ(y|x) - log π_ref(y|x))
    z_ref = max(0, mean over mismatched pairs of β · (log π_θ(y'|x) - log π_ref(y'|x)))  (no grad)
    desirable:   λ_D · (1 - σ(h - z_ref))
    undesirable: λ_U · (1 - σ(z_ref - h))

averaged over rows (one unit per row). The mismatched pairs (x, y') pair each prompt with
another row's completion; their log-probs come from the trainer. `all_reduce` sums a tensor
over processes so z_ref is the global batch's estimate (as TRL gathers it).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from posttrain.losses.types import LossOutput


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def kto_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    kl_policy_logps: torch.Tensor,
    kl_ref_logps: torch.Tensor,
    desirable: torch.Tensor,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    all_reduce: Callable[[torch.Tensor], torch.Tensor] = _identity,
) -> LossOutput:
    """policy/ref_logps: (B,) summed completion log-probs of the rows; kl_*: (M,) the same for
    the mismatched (prompt, other completion) pairs; desirable: (B,) bool."""
    desirable = desirable.bool()
    with torch.no_grad():
        kl_sum = all_reduce((kl_policy_logps.float() - kl_ref_logps.float()).sum())
        kl_count = all_reduce(torch.tensor(float(kl_policy_logps.numel()), device=kl_sum.device))
        kl = (kl_sum / kl_count.clamp(min=1)).clamp(min=0)  # mean log-ratio, ≥ 0
    rewards = beta * (policy_logps.float() - ref_logps.float())  # (B,) h
    z_ref = beta * kl
    losses = torch.where(
        desirable,
        desirable_weight * (1.0 - torch.sigmoid(rewards - z_ref)),
        undesirable_weight * (1.0 - torch.sigmoid(z_ref - rewards)),
    )  # (B,)
    with torch.no_grad():
        zero = rewards.new_zeros(())
        n_good, n_bad = desirable.sum(), (~desirable).sum()
        metrics = {
            "kl": kl,
            "rewards_chosen": torch.where(desirable, rewards, zero).sum() / n_good.clamp(min=1),
            "rewards_rejected": torch.where(desirable, zero, rewards).sum() / n_bad.clamp(min=1),
            "desirable_fraction": desirable.float().mean(),
            "logps": policy_logps.float().mean(),
        }
    units = torch.tensor(float(losses.shape[0]), device=losses.device)
    return LossOutput(total=losses.sum(), units=units, metrics=metrics)
