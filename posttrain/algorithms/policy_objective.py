"""GRPO's choice of policy loss, advantage estimator and rollout correction (spec §7, §13).

The maths lives in posttrain/losses (POLICY_LOSSES, ADVANTAGE_ESTIMATORS, ROLLOUT_CORRECTIONS,
each keyed by the config Literal); this helper only reads the `grpo` config section and feeds
them, so the trainer has no branch per variant.

Deliberate choices:
- An unset clip range (`epsilon_low/high: null`) takes the loss's paper default (CLIP_DEFAULTS:
  0.2/0.2 for grpo-style losses, 3e-4/4e-4 for GSPO, no lower clip and a cap of 5 for CISPO).
- REINFORCE++ puts the KL penalty into the reward (coefficient `grpo.beta`, k1 of π_old against
  π_ref), so the loss itself then gets β = 0 (the KL is not counted twice).
- Rollout correction compares the trainer's π_old (the detached training forward when
  num_iterations = 1) with the engine's sampling log-probs μ of the same tokens. MIS drops
  tokens from the loss but not from the unit count, so a dropped token counts as a zero loss.
"""

from __future__ import annotations

import torch
from accelerate import Accelerator

from posttrain.config import ConfigError
from posttrain.losses.advantages import ADVANTAGE_ESTIMATORS
from posttrain.losses.policy import CLIP_DEFAULTS, POLICY_LOSSES
from posttrain.losses.rollout_correction import ROLLOUT_CORRECTIONS
from posttrain.losses.types import LossOutput

TOKEN_UNIT_LOSSES = ("dapo", "cispo")  # normalised by the number of completion tokens


def validate(g) -> None:
    """Config combinations the losses cannot honour, named by their keys."""
    if g.loss_type == "gspo" and g.advantage == "reinforce_pp":
        raise ConfigError(
            "grpo.loss_type gspo needs one advantage per sequence; grpo.advantage reinforce_pp "
            "gives one per token: use grpo.loss_type gspo_token"
        )
    if g.rollout_correction != "none" and g.rollout_correction_cap <= 1.0:
        raise ConfigError(
            f"grpo.rollout_correction_cap must be > 1, got {g.rollout_correction_cap}"
        )


def clip_range(g) -> tuple[float, float]:
    low, high = CLIP_DEFAULTS.get(g.loss_type, (0.2, 0.2))
    return (
        low if g.epsilon_low is None else g.epsilon_low,
        high if g.epsilon_high is None else g.epsilon_high,
    )


def loss_beta(g) -> float:
    return 0.0 if g.advantage == "reinforce_pp" else g.beta


def advantages(
    g,
    rewards: torch.Tensor,
    loss_mask: torch.Tensor,
    old_logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor | None,
    accelerator: Accelerator,
) -> torch.Tensor:
    """(N,) or (N, C) advantages for the non-group estimators (GRPO keeps its own "group" path,
    which gathers rewards for the batch std)."""

    def all_reduce(x: torch.Tensor) -> torch.Tensor:
        if accelerator.num_processes == 1:
            return x
        return accelerator.reduce(x.to(accelerator.device), reduction="sum").to(x.device)

    return ADVANTAGE_ESTIMATORS[g.advantage](
        rewards,
        g.num_generations,
        completion_mask=loss_mask,
        scale=g.scale_rewards,
        kl_coef=g.beta,
        logprobs=old_logprobs,
        ref_logprobs=ref_logprobs,
        all_reduce=all_reduce,
    )


def policy_loss(g, logprobs: torch.Tensor, old_logprobs: torch.Tensor, batch) -> LossOutput:
    """The configured loss of one micro-batch, after the configured rollout correction."""
    mask = batch.completion_mask.bool()
    weights, correction_metrics = None, {}
    if batch.rollout_logprobs is not None:
        weights, mask, correction_metrics = ROLLOUT_CORRECTIONS[g.rollout_correction](
            old_logprobs, batch.rollout_logprobs, mask, g.rollout_correction_cap
        )
    eps_low, eps_high = clip_range(g)
    out = POLICY_LOSSES[g.loss_type](
        logprobs,
        old_logprobs,
        batch.advantages,
        mask,
        eps_low,
        eps_high,
        loss_beta(g),
        batch.ref_logprobs,
        g.max_new_tokens,
        weights,
    )
    out.metrics.update(correction_metrics)
    return out
