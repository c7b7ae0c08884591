"""Kimi k1.5 policy optimisation (spec §8; Kimi Team 2025, §2.3.2, eq. 3 and the length penalty).

Online mirror descent with the iteration-start policy π_θi as reference and the group mean
reward r̄ standing in for τ log Z:

    L(θ) = mean_j ( r_j - r̄ - τ · log[π_θ(y_j|x) / π_θi(y_j|x)] )²

Gradient relation (checked in the tests). Write a_j = r_j - r̄ and ℓ_j = log π_θ(y_j) -
log π_θi(y_j). Then ∇L = (1/k) Σ_j 2(a_j - τ ℓ_j)(-τ ∇ℓ_j) = -2τ · g, where

    g = (1/k) Σ_j [ ∇log π_θ(y_j)·(r_j - r̄) - (τ/2) ∇(ℓ_j)² ]

is the paper's surrogate gradient (an ascent direction). So descending L moves along g, scaled
by 2τ; per sample, ∂L/∂log π_θ(y_j) = -(2τ/k)·(a_j - τ ℓ_j).

Rows [g*k:(g+1)*k] are one problem's k samples. The "mean" runs over all N samples of the
micro-batch (one unit per sample), which is the per-problem mean when groups are equal-sized.
"""

from __future__ import annotations

import torch

from posttrain.losses.types import LossOutput


def _grouped(x: torch.Tensor, group_size: int) -> torch.Tensor:
    if x.ndim != 1 or x.shape[0] % group_size != 0:
        raise ValueError(
            f"expected (N,) with N divisible by group_size={group_size}, got {tuple(x.shape)}"
        )
    return x.view(-1, group_size)  # (N/k, k)


def kimi_loss(
    logprobs_seq: torch.Tensor,
    ref_logprobs_seq: torch.Tensor,
    rewards: torch.Tensor,
    group_size: int,
    tau: float,
) -> LossOutput:
    """Summed squared mirror-descent residuals; units = N samples.

    logprobs_seq: (N,) Σ_t log π_θ over each response; ref_logprobs_seq: (N,) the same under
    π_θi; rewards: (N,). Metrics: reward_mean, log_ratio_mean, residual_mean.
    """
    grouped = _grouped(rewards.float(), group_size)  # (N/k, k)
    centred = (grouped - grouped.mean(dim=1, keepdim=True)).reshape(-1)  # (N,) r_j - r̄
    log_ratio = logprobs_seq.float() - ref_logprobs_seq.float()  # (N,)
    residual = centred - tau * log_ratio  # (N,)
    with torch.no_grad():
        metrics = {
            "reward_mean": rewards.float().mean(),
            "log_ratio_mean": log_ratio.mean(),
            "residual_mean": residual.mean(),
        }
    units = torch.tensor(float(rewards.shape[0]), device=rewards.device)
    return LossOutput(total=(residual**2).sum(), units=units, metrics=metrics)


def kimi_length_penalty(
    lengths: torch.Tensor, correct: torch.Tensor, group_size: int
) -> torch.Tensor:
    """Length reward within each group of k samples. lengths, correct (bool): (N,) -> (N,).

    λ_j = 0.5 - (len_j - min_len) / (max_len - min_len); correct -> λ_j, wrong -> min(0, λ_j).
    A group whose lengths are all equal gets 0 for every sample.
    """
    grouped = _grouped(lengths.float(), group_size)  # (N/k, k)
    shortest = grouped.amin(dim=1, keepdim=True)  # (N/k, 1)
    spread = grouped.amax(dim=1, keepdim=True) - shortest  # (N/k, 1)
    lam = 0.5 - (grouped - shortest) / spread.clamp(min=1e-12)  # (N/k, k)
    lam = lam.masked_fill(spread == 0, 0.0).reshape(-1)  # (N,)
    return torch.where(correct.bool(), lam, lam.clamp(max=0.0))
