"""PPO for RLHF (spec §6): GAE, clipped policy and value losses, KL-shaped rewards, KL control.

- GAE: Schulman et al. 2016, eq. 16: δ_t = r_t + γV_{t+1} - V_t, A_t = Σ_l (γλ)^l δ_{t+l},
  R_t = A_t + V_t, over RIGHT-padded responses: V beyond the last valid token is 0 (the episode
  ends there) and padded positions get A = R = 0. Advantages are not whitened here; the
  trainer applies `masked_whiten` over the batch.
- Policy loss: Schulman et al. 2017, eq. 7, token-level (one unit per response token).
- Value loss: ½·max((V-R)², (V_old + clip(V-V_old, ±ε_v) - R)²) as in Ziegler et al. 2019 /
  TRL; one unit per token.
- Rewards: r_t = -β·KL_t per token plus the score on the last valid token (Ziegler et al. 2019,
  eq. 2; Ouyang et al. 2022); KL_t is k1 (log π - log π_ref) or k3.
- Adaptive KL (Ziegler et al. 2019, §2.2): e = clip(KL/KL_target - 1, ±0.2),
  β ← β·(1 + K·e·n/horizon). The spec leaves K unnamed; K = `gain` defaults to 1, which is the
  formula of OpenAI's lm-human-preferences code and TRL.
"""

from __future__ import annotations

import torch

from posttrain.losses.common import masked_mean, masked_sum, masked_var
from posttrain.losses.grpo import k3_kl
from posttrain.losses.types import LossOutput

KL_ESTIMATORS = ("k1", "k3")


@torch.no_grad()
def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns), each (B, T) and detached, from per-token rewards and values (B, T).

    `mask` (B, T) marks the response tokens of each row as a prefix (right padding).
    """
    mask = mask.bool()
    rewards = rewards.float().masked_fill(~mask, 0.0)  # (B, T)
    values = values.float().masked_fill(~mask, 0.0)  # (B, T) so V = 0 after the last token
    num_steps = rewards.shape[1]
    advantages = torch.zeros_like(rewards)  # (B, T)
    running = torch.zeros_like(rewards[:, 0])  # (B,)
    for t in reversed(range(num_steps)):
        next_values = values[:, t + 1] if t + 1 < num_steps else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_values - values[:, t]  # (B,)
        running = delta + gamma * lam * running
        advantages[:, t] = running
    advantages = advantages.masked_fill(~mask, 0.0)
    return advantages, advantages + values


def ppo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float,
) -> LossOutput:
    """Summed clipped-surrogate loss over response tokens. All inputs (B, T).

    Metrics: clip_fraction (tokens where the clipped term binds), approx_kl = mean ½(log ρ)²,
    approx_kl_k3 = mean (ρ - 1) - log ρ, ratio_mean.
    """
    mask = mask.bool()
    log_ratio = logprobs.float() - old_logprobs.float()  # (B, T)
    ratio = torch.exp(log_ratio)  # (B, T)
    adv = advantages.float()
    unclipped = -adv * ratio  # (B, T)
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)  # (B, T)
    total = masked_sum(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        metrics = {
            "clip_fraction": masked_mean((clipped > unclipped).float(), mask),
            "approx_kl": masked_mean(0.5 * log_ratio**2, mask),
            "approx_kl_k3": masked_mean((ratio - 1.0) - log_ratio, mask),
            "ratio_mean": masked_mean(ratio, mask),
        }
    return LossOutput(total=total, units=mask.sum().float(), metrics=metrics)


def ppo_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_eps_value: float,
) -> LossOutput:
    """Summed clipped value loss over response tokens. All inputs (B, T).

    Metrics: value_clip_fraction (tokens where the clipped error is the larger one) and
    explained_variance = 1 - Var[R - V] / Var[R] (population variances over masked tokens, as
    cleanrl; nan when Var[R] = 0).
    """
    mask = mask.bool()
    values = values.float()
    returns = returns.float()
    old_values = old_values.float()
    clipped_values = old_values + torch.clamp(values - old_values, -clip_eps_value, clip_eps_value)
    unclipped_error = (values - returns) ** 2  # (B, T)
    clipped_error = (clipped_values - returns) ** 2  # (B, T)
    total = masked_sum(0.5 * torch.maximum(unclipped_error, clipped_error), mask)
    with torch.no_grad():
        residual_var = masked_var(returns - values, mask, unbiased=False)
        metrics = {
            "value_clip_fraction": masked_mean((clipped_error > unclipped_error).float(), mask),
            "explained_variance": 1.0 - residual_var / masked_var(returns, mask, unbiased=False),
        }
    return LossOutput(total=total, units=mask.sum().float(), metrics=metrics)


@torch.no_grad()
def kl_penalized_rewards(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    estimator: str = "k1",
) -> torch.Tensor:
    """Per-token rewards (B, T): -kl_coef·KL_t on response tokens, plus scores (B,) on each
    row's last valid token (rows with no valid token get no score). 0 on padding."""
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"estimator must be one of {KL_ESTIMATORS}, got {estimator!r}")
    mask = mask.bool()
    logprobs, ref_logprobs = logprobs.float(), ref_logprobs.float()
    kl = logprobs - ref_logprobs if estimator == "k1" else k3_kl(logprobs, ref_logprobs)
    rewards = (-kl_coef * kl).masked_fill(~mask, 0.0)  # (B, T)
    positions = torch.arange(mask.shape[1], device=mask.device)  # (T,)
    last = (positions * mask).argmax(dim=1, keepdim=True)  # (B, 1) last valid index
    score = (scores.float() * mask.any(dim=1)).unsqueeze(1)  # (B, 1)
    return rewards.scatter_add(1, last, score)


class FixedKLController:
    """Constant KL coefficient with the same interface as `AdaptiveKLController`."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """No-op."""

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Ziegler et al. 2019 proportional controller driving the observed KL toward `target`."""

    def __init__(self, init_kl_coef: float, target: float, horizon: float, gain: float = 1.0):
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)
        self.gain = float(gain)

    def update(self, current_kl: float, n_steps: int) -> None:
        """β ← β·(1 + gain·clip(KL/target - 1, -0.2, 0.2)·n_steps/horizon)."""
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + self.gain * error * n_steps / self.horizon

    def state_dict(self) -> dict[str, float]:
        """Only β: target, horizon and gain come from the (possibly edited) config on resume."""
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])
