"""Rollout / training mismatch correction (spec §13): truncated or masked importance sampling.

The rollout engine samples from μ (its own kernels, maybe bf16 or speculative); the trainer's
π_old of the same tokens differs slightly. The policy gradient is then off-policy by
ρ_t = π_old(o_t) / μ(o_t). Yao et al. 2025 ("Your efficient RL framework secretly brings you
off-policy RL training"), §2: truncated importance sampling (TIS) multiplies each token's
loss by w_t = sg[min(ρ_t, C)]; masked importance sampling (MIS, Liu et al. 2025, "When speed
kills stability") instead drops the tokens whose ratio leaves [1/C, C].

Each correction maps (π_old, μ, mask, C) to (token_weights or None, new mask, metrics), so the
trainer dispatches through `ROLLOUT_CORRECTIONS[cfg.rollout_correction]`. Metrics (over the
loss tokens): rollout_logp_abs_diff = mean |log π_old - log μ| (also for "none", to watch the
mismatch), rollout_corrected_fraction = fraction of tokens capped (tis) or masked (mis).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from posttrain.losses.common import masked_mean

Correction = tuple[torch.Tensor | None, torch.Tensor, dict[str, torch.Tensor]]


def _log_ratio(old_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor) -> torch.Tensor:
    return (old_logprobs.float() - rollout_logprobs.float()).detach()  # (N, T) log ρ


def no_correction(
    old_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, mask: torch.Tensor, cap: float
) -> Correction:
    log_ratio = _log_ratio(old_logprobs, rollout_logprobs)
    metrics = {
        "rollout_logp_abs_diff": masked_mean(log_ratio.abs(), mask),
        "rollout_corrected_fraction": torch.zeros((), device=mask.device),
    }
    return None, mask, metrics


def truncated_is(
    old_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, mask: torch.Tensor, cap: float
) -> Correction:
    """TIS: weights min(π_old/μ, C), (N, T); the mask is unchanged."""
    log_ratio = _log_ratio(old_logprobs, rollout_logprobs)
    ratio = torch.exp(log_ratio)  # (N, T)
    weights = torch.clamp(ratio, max=cap).masked_fill(~mask.bool(), 0.0)
    metrics = {
        "rollout_logp_abs_diff": masked_mean(log_ratio.abs(), mask),
        "rollout_corrected_fraction": masked_mean((ratio > cap).float(), mask),
    }
    return weights, mask, metrics


def masked_is(
    old_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, mask: torch.Tensor, cap: float
) -> Correction:
    """MIS (token level): drop tokens whose π_old/μ leaves [1/C, C]; no reweighting."""
    log_ratio = _log_ratio(old_logprobs, rollout_logprobs)
    limit = torch.log(torch.tensor(cap, dtype=log_ratio.dtype))
    outside = log_ratio.abs() > limit  # (N, T)
    metrics = {
        "rollout_logp_abs_diff": masked_mean(log_ratio.abs(), mask),
        "rollout_corrected_fraction": masked_mean(outside.float(), mask),
    }
    return None, mask.bool() & ~outside, metrics


ROLLOUT_CORRECTIONS: dict[str, Callable[..., Correction]] = {
    "none": no_correction,
    "tis": truncated_is,
    "mis": masked_is,
}
