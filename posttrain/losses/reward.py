"""Bradley-Terry reward-model loss (spec §4; Ouyang et al. 2022, eq. 1).

    L = -log σ(r_w - r_l - m) + c · (r_w + r_l)²

m is the optional per-pair margin (Llama 2, Touvron et al. 2023, eq. 2); c the optional
centring coefficient (Eisenstein et al. 2023) that keeps rewards near zero. One unit per pair.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from posttrain.losses.types import LossOutput


def bradley_terry_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    margin: torch.Tensor | None = None,
    centering_coef: float = 0.0,
) -> LossOutput:
    """Summed Bradley-Terry loss over pairs. chosen/rejected rewards and margin: (B,)."""
    chosen = chosen_rewards.float()  # (B,)
    rejected = rejected_rewards.float()  # (B,)
    diff = chosen - rejected  # (B,)
    logits = diff if margin is None else diff - margin.float()
    losses = -F.logsigmoid(logits)  # (B,)
    if centering_coef != 0.0:
        losses = losses + centering_coef * (chosen + rejected) ** 2
    with torch.no_grad():
        metrics = {
            "accuracy": (chosen > rejected).float().mean(),
            "reward_chosen": chosen.mean(),
            "reward_rejected": rejected.mean(),
            "reward_margin": diff.mean(),
        }
    units = torch.tensor(float(chosen.shape[0]), device=chosen.device)
    return LossOutput(total=losses.sum(), units=units, metrics=metrics)
