"""Sequence-level and clipped-IS policy losses (spec §13): GSPO, GSPO-token, CISPO.

GSPO: Zheng et al. 2025 ("Group Sequence Policy Optimization", Qwen), eq. 5-7 (sequence ratio
s_i = exp(mean_t log π_θ/π_old), clipped per sequence) and eq. 13-14 (GSPO-token:
s_{i,t} = sg[s_i] · π_θ(o_t)/sg[π_θ(o_t)], same value as s_i, gradient per token so per-token
advantages can be used). Paper clip range ε_low = 3e-4, ε_high = 4e-4 (§5.1).

CISPO: MiniMax-M1 technical report 2025, eq. 4-5: every token keeps its gradient; only the
importance weight is clipped and detached, L = -Σ sg[clip(ρ, 1-ε_low, 1+ε_high)] Â log π_θ,
normalised by the number of completion tokens. MiniMax set no lower clip (ε_low large).

All three share `grpo_policy_loss`'s signature (see losses/policy.py), including the optional
`token_weights` (rollout-mismatch correction, losses/rollout_correction.py) that multiply the
policy-gradient part of each token's loss, and the optional -β·k3 KL term, aggregated like the
policy term. Advantages may be (N,) (one per sequence) or (N, T) (per token, e.g. REINFORCE++)
for gspo_token and cispo; gspo needs one advantage per sequence.

Deliberate deviation: GSPO has one ratio per sequence, so a token-level correction weight is
turned into one per sequence as the geometric mean of the sequence's token weights (the same
length normalisation GSPO applies to the ratio itself).
"""

from __future__ import annotations

import torch

from posttrain.losses.common import clip_metrics, masked_mean, masked_sum
from posttrain.losses.grpo import k3_kl
from posttrain.losses.types import LossOutput


def _token_advantages(advantages: torch.Tensor) -> torch.Tensor:
    """(N,) -> (N, 1); (N, T) unchanged. Broadcasts against (N, T) token tensors."""
    adv = advantages.float()
    return adv.unsqueeze(1) if adv.ndim == 1 else adv


def _kl(beta, logprobs, ref_logprobs):
    if beta != 0.0 and ref_logprobs is None:
        raise ValueError("beta > 0 needs ref_logprobs")
    return None if ref_logprobs is None else k3_kl(logprobs.float(), ref_logprobs.float())


def _units(n: float, device) -> torch.Tensor:
    return torch.tensor(n, device=device)


def gspo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    completion_mask: torch.Tensor,
    eps_low: float = 3e-4,
    eps_high: float = 4e-4,
    beta: float = 0.0,
    ref_logprobs: torch.Tensor | None = None,
    max_completion_length: int | None = None,
    token_weights: torch.Tensor | None = None,
) -> LossOutput:
    """GSPO: -Σ_i min(s_i Â_i, clip(s_i, 1-ε_low, 1+ε_high) Â_i), one unit per sequence.

    logprobs, old_logprobs, ref_logprobs, completion_mask, token_weights: (N, T); advantages: (N,).
    The KL term enters as β · (sequence mean of k3). Metrics: clip_fraction (of sequences),
    ratio_mean (mean s_i), kl.
    """
    if advantages.ndim != 1:
        raise ValueError("gspo needs one advantage per sequence (N,); use gspo_token for (N, T)")
    mask = completion_mask.bool()  # (N, T)
    kl = _kl(beta, logprobs, ref_logprobs)
    log_ratio = (logprobs.float() - old_logprobs.float()).masked_fill(~mask, 0.0)  # (N, T)
    seq_ratio = torch.exp(masked_mean(log_ratio, mask, dim=1))  # (N,) s_i
    adv = advantages.float()  # (N,)
    clipped = torch.clamp(seq_ratio, 1.0 - eps_low, 1.0 + eps_high)
    objective = torch.minimum(seq_ratio * adv, clipped * adv)  # (N,)
    if token_weights is not None:
        log_w = torch.log(token_weights.float().clamp(min=1e-30)).masked_fill(~mask, 0.0)
        objective = objective * torch.exp(masked_mean(log_w, mask, dim=1)).detach()
    if beta != 0.0:
        objective = objective - beta * masked_mean(kl, mask, dim=1)
    has_tokens = mask.any(dim=1)  # a fully masked sequence (e.g. truncated) contributes nothing
    total = -(objective.masked_fill(~has_tokens, 0.0)).sum()
    metrics = clip_metrics(seq_ratio, adv, eps_low, eps_high, has_tokens, kl, kl_mask=mask)
    return LossOutput(total, _units(float(logprobs.shape[0]), logprobs.device), metrics)


def gspo_token_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    completion_mask: torch.Tensor,
    eps_low: float = 3e-4,
    eps_high: float = 4e-4,
    beta: float = 0.0,
    ref_logprobs: torch.Tensor | None = None,
    max_completion_length: int | None = None,
    token_weights: torch.Tensor | None = None,
) -> LossOutput:
    """GSPO-token: -Σ_i (1/|o_i|) Σ_t min(s_{i,t} Â_{i,t}, clip(s_{i,t}) Â_{i,t}).

    s_{i,t} = sg[s_i] · exp(log π_θ - sg[log π_θ]): value s_i, gradient through each token.
    With per-sequence advantages its value and gradient equal gspo's. Units: N sequences.
    """
    mask = completion_mask.bool()  # (N, T)
    kl = _kl(beta, logprobs, ref_logprobs)
    logprobs = logprobs.float()
    log_ratio = (logprobs - old_logprobs.float()).masked_fill(~mask, 0.0)  # (N, T)
    seq_log_ratio = masked_mean(log_ratio, mask, dim=1).detach().unsqueeze(1)  # (N, 1)
    ratio = torch.exp(seq_log_ratio + logprobs - logprobs.detach())  # (N, T) value s_i
    adv = _token_advantages(advantages)
    clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)
    objective = torch.minimum(ratio * adv, clipped * adv)  # (N, T)
    if token_weights is not None:
        objective = objective * token_weights.float().detach()
    if beta != 0.0:
        objective = objective - beta * kl
    seq_lengths = mask.sum(dim=1).clamp(min=1)  # (N,)
    total = (masked_sum(-objective, mask, dim=1) / seq_lengths).sum()
    metrics = clip_metrics(ratio, adv, eps_low, eps_high, mask, kl)
    return LossOutput(total, _units(float(logprobs.shape[0]), logprobs.device), metrics)


def cispo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    completion_mask: torch.Tensor,
    eps_low: float = 1.0,
    eps_high: float = 4.0,
    beta: float = 0.0,
    ref_logprobs: torch.Tensor | None = None,
    max_completion_length: int | None = None,
    token_weights: torch.Tensor | None = None,
) -> LossOutput:
    """CISPO: -Σ_{i,t} sg[clip(ρ_{i,t}, 1-ε_low, 1+ε_high)] Â_{i,t} log π_θ(o_{i,t}), one unit
    per completion token (Σ_i |o_i|). ε_low = 1 is no lower clip (ρ > 0 always).

    The gradient is sg[w] Â ∇log π_θ for every token, even those whose ratio is clipped: this is
    the point of CISPO (PPO/GRPO clipping zeroes those tokens' gradients).
    """
    mask = completion_mask.bool()  # (N, T)
    kl = _kl(beta, logprobs, ref_logprobs)
    logprobs = logprobs.float()
    ratio = torch.exp(logprobs - old_logprobs.float()).detach()  # (N, T)
    weight = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)  # (N, T) sg[clip(ρ)]
    if token_weights is not None:
        weight = weight * token_weights.float().detach()
    objective = weight * _token_advantages(advantages) * logprobs  # (N, T)
    if beta != 0.0:
        objective = objective - beta * kl
    total = masked_sum(-objective, mask)
    with torch.no_grad():
        low = ratio < 1.0 - eps_low
        high = ratio > 1.0 + eps_high
        metrics = {
            "clip_fraction": masked_mean((low | high).float(), mask),
            "clip_fraction_low": masked_mean(low.float(), mask),
            "clip_fraction_high": masked_mean(high.float(), mask),
            "ratio_mean": masked_mean(ratio, mask),
        }
        if kl is not None:
            metrics["kl"] = masked_mean(kl, mask)
    return LossOutput(total, mask.sum().float(), metrics)
