"""Every critic-free policy loss behind one signature, keyed by `grpo.loss_type` (spec §7, §13).

`POLICY_LOSSES[loss_type](logprobs, old_logprobs, advantages, completion_mask, eps_low,
eps_high, beta, ref_logprobs, max_completion_length, token_weights)` -> LossOutput, so the
trainer needs no branch per variant. `CLIP_DEFAULTS` holds each loss's (ε_low, ε_high) from its
paper, used when the recipe leaves the clip range unset: GRPO's 0.2/0.2 are ratios around 1,
GSPO's 3e-4/4e-4 are for a length-normalised sequence ratio (GSPO §5.1), CISPO's 1.0/4.0 mean no
lower clip and an IS-weight cap of 5 (MiniMax-M1; ScaleRL's ε_max = 5, TRL's recommendation).
"""

from __future__ import annotations

from collections.abc import Callable

from posttrain.losses.grpo import grpo_policy_loss
from posttrain.losses.gspo import cispo_loss, gspo_loss, gspo_token_loss
from posttrain.losses.types import LossOutput


def _aggregation(loss_type: str) -> Callable[..., LossOutput]:
    """grpo_policy_loss with its aggregation fixed, in the shared signature."""

    def loss(
        logprobs,
        old_logprobs,
        advantages,
        completion_mask,
        eps_low=0.2,
        eps_high=0.2,
        beta=0.0,
        ref_logprobs=None,
        max_completion_length=None,
        token_weights=None,
    ) -> LossOutput:
        return grpo_policy_loss(
            logprobs,
            old_logprobs,
            advantages,
            completion_mask,
            loss_type,
            eps_low,
            eps_high,
            beta,
            ref_logprobs,
            max_completion_length,
            token_weights,
        )

    loss.__name__ = f"{loss_type}_loss"
    return loss


POLICY_LOSSES: dict[str, Callable[..., LossOutput]] = {
    "grpo": _aggregation("grpo"),
    "dr_grpo": _aggregation("dr_grpo"),
    "dapo": _aggregation("dapo"),
    "gspo": gspo_loss,
    "gspo_token": gspo_token_loss,
    "cispo": cispo_loss,
}

CLIP_DEFAULTS: dict[str, tuple[float, float]] = {
    "grpo": (0.2, 0.2),
    "dr_grpo": (0.2, 0.2),
    "dapo": (0.2, 0.2),
    "gspo": (3e-4, 4e-4),
    "gspo_token": (3e-4, 4e-4),
    "cispo": (1.0, 4.0),
}
