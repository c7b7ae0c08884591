"""ORPO: Hong et al. 2024 ("ORPO: Monolithic Preference Optimization without Reference Model"),
eq. 4-7 (spec §14). No reference model.

With the length-normalised log-likelihood ℓ(y) = (1/|y|) Σ_t log π_θ(y_t | x, y_<t) and
p = exp ℓ, odds(y) = p / (1 - p), so log odds(y) = ℓ - log(1 - exp ℓ), computed stably as
ℓ - log1p(-exp ℓ) (ℓ < 0 always). Per pair:

    L = -ℓ(y_w) - λ · log σ( log odds(y_w) - log odds(y_l) )

i.e. the SFT NLL of the chosen answer plus λ times the odds-ratio term (λ ≈ 0.1 in the paper;
TRL calls it `beta`). Deliberate deviation from TRL: the NLL is each pair's chosen-token mean,
so every pair weighs the same in both terms and the loss does not depend on how pairs are
grouped into micro-batches; TRL averages the NLL over all chosen tokens of its batch (equal when
the chosen answers have equal lengths). One unit per pair.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from posttrain.losses.types import LossOutput


def log_odds(mean_logps: torch.Tensor) -> torch.Tensor:
    """log(p / (1 - p)) for p = exp(mean_logps) < 1, stably: ℓ - log1p(-exp ℓ)."""
    # clamp keeps ℓ = 0 exactly (a sure answer) from giving log(0); -1e-7 is e^ℓ ≈ 1 - 1e-7
    mean_logps = mean_logps.clamp(max=-1e-7)
    return mean_logps - torch.log1p(-torch.exp(mean_logps))


def odds_ratio_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    lam: float,
) -> LossOutput:
    """chosen/rejected_logps: (B,) SUMMED log-probs; *_lengths: (B,) completion tokens."""
    chosen_mean = chosen_logps.float() / chosen_lengths.float().clamp(min=1)  # (B,) ℓ(y_w)
    rejected_mean = rejected_logps.float() / rejected_lengths.float().clamp(min=1)  # (B,)
    log_odds_ratio = log_odds(chosen_mean) - log_odds(rejected_mean)  # (B,)
    odds_term = F.logsigmoid(log_odds_ratio)  # (B,)
    nll = -chosen_mean  # (B,)
    losses = nll - lam * odds_term
    with torch.no_grad():
        rewards_chosen, rewards_rejected = lam * chosen_mean, lam * rejected_mean
        metrics = {
            "nll": nll.mean(),
            "log_odds_ratio": log_odds_ratio.mean(),
            "odds_ratio_loss": -odds_term.mean(),
            "rewards_chosen": rewards_chosen.mean(),
            "rewards_rejected": rewards_rejected.mean(),
            "rewards_margin": (rewards_chosen - rewards_rejected).mean(),
            "rewards_accuracy": (rewards_chosen > rewards_rejected).float().mean(),
            "logps_chosen": chosen_logps.float().mean(),
            "logps_rejected": rejected_logps.float().mean(),
        }
    units = torch.tensor(float(losses.shape[0]), device=losses.device)
    return LossOutput(total=losses.sum(), units=units, metrics=metrics)
