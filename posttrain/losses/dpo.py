"""Offline preference losses: the DPO family (spec §5). One unit per (chosen, rejected) pair.

With h = [log π(y_w) - log π_ref(y_w)] - [log π(y_l) - log π_ref(y_l)]:

- sigmoid: DPO, Rafailov et al. 2023, eq. 7: -log σ(β h)
- cdpo: conservative DPO (Mitchell 2023, "A note on DPO with noisy preferences"), label
  smoothing ε: -(1-ε) log σ(β h) - ε log σ(-β h). A smoothed target: the optimum keeps
  σ(β h) at 1-ε instead of pushing h to infinity. (This was called "robust" before.)
- robust: the unbiased loss of Chowdhury et al. 2024 ("Provably robust DPO"), eq. 9, TRL's
  "robust": (-(1-ε) log σ(β h) + ε log σ(-β h)) / (1 - 2ε). Note the PLUS sign: it debiases the
  loss under a flip rate ε (its expectation over noisy labels is the clean DPO loss) rather
  than smoothing the target; needs ε < 1/2.
- hinge: SLiC-HF, Zhao et al. 2023, eq. 2 (calibration term only): max(0, 1 - β h)
- ipo: Azar et al. 2023, eq. 17: (h - 1/(2β))², with every logp (policy and reference)
  divided by its completion length, as in TRL
- simpo: Meng et al. 2024, eq. 6 (reference-free): -log σ(β/|y_w| log π(y_w) - β/|y_l| log π(y_l) - γ)
- orpo: Hong et al. 2024, eq. 6-7 (reference-free; losses/orpo.py), β is ORPO's λ.

All of them share one signature so a trainer can dispatch through `DPO_LOSSES[cfg.loss_type]`;
a hyperparameter a variant does not use is ignored (label_smoothing only matters to "cdpo" and
"robust", gamma only to "simpo").

Logged implicit rewards are β·(log π - log π_ref) (for ipo with the length-averaged logps that
enter h, so rewards_margin = β·mean(h); for simpo β·log π/|y|). logps_chosen/rejected are the
means of the summed policy logps as given.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from posttrain.losses.orpo import odds_ratio_loss
from posttrain.losses.types import LossOutput


@dataclass(frozen=True)
class PreferenceLogps:
    """Summed response log-probs per pair, from one concatenated forward pass."""

    chosen: torch.Tensor  # (B,) Σ_t log π_θ(y_w,t | x, y_w,<t)
    rejected: torch.Tensor  # (B,) Σ_t log π_θ(y_l,t | x, y_l,<t)
    ref_chosen: torch.Tensor | None = None  # (B,) same under π_ref; None for simpo
    ref_rejected: torch.Tensor | None = None  # (B,)
    chosen_lengths: torch.Tensor | None = None  # (B,) completion tokens |y_w| (ipo, simpo)
    rejected_lengths: torch.Tensor | None = None  # (B,) completion tokens |y_l|


def _need(value: torch.Tensor | None, field: str, loss: str) -> torch.Tensor:
    if value is None:
        raise ValueError(f"the {loss!r} preference loss needs PreferenceLogps.{field}")
    return value.float()


def _log_ratios(
    logps: PreferenceLogps, loss: str, length_average: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log π - log π_ref) for chosen and rejected, each (B,)."""
    chosen, rejected = logps.chosen.float(), logps.rejected.float()
    ref_chosen = _need(logps.ref_chosen, "ref_chosen", loss)
    ref_rejected = _need(logps.ref_rejected, "ref_rejected", loss)
    chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
    if length_average:
        chosen_ratio = chosen_ratio / _need(logps.chosen_lengths, "chosen_lengths", loss)
        rejected_ratio = rejected_ratio / _need(logps.rejected_lengths, "rejected_lengths", loss)
    return chosen_ratio, rejected_ratio


def _output(
    losses: torch.Tensor,
    rewards_chosen: torch.Tensor,
    rewards_rejected: torch.Tensor,
    logps: PreferenceLogps,
) -> LossOutput:
    # losses, rewards_*: (B,)
    with torch.no_grad():
        metrics = {
            "rewards_chosen": rewards_chosen.mean(),
            "rewards_rejected": rewards_rejected.mean(),
            "rewards_margin": (rewards_chosen - rewards_rejected).mean(),
            "rewards_accuracy": (rewards_chosen > rewards_rejected).float().mean(),
            "logps_chosen": logps.chosen.float().mean(),
            "logps_rejected": logps.rejected.float().mean(),
        }
    units = torch.tensor(float(losses.shape[0]), device=losses.device)
    return LossOutput(total=losses.sum(), units=units, metrics=metrics)


def sigmoid_loss(
    logps: PreferenceLogps, beta: float, label_smoothing: float = 0.0, gamma: float = 0.0
) -> LossOutput:
    """DPO: -log σ(β h)."""
    chosen_ratio, rejected_ratio = _log_ratios(logps, "sigmoid")
    losses = -F.logsigmoid(beta * (chosen_ratio - rejected_ratio))  # (B,)
    return _output(losses, beta * chosen_ratio, beta * rejected_ratio, logps)


def cdpo_loss(
    logps: PreferenceLogps, beta: float, label_smoothing: float = 0.0, gamma: float = 0.0
) -> LossOutput:
    """cDPO: -(1-ε) log σ(β h) - ε log σ(-β h), ε = label_smoothing."""
    chosen_ratio, rejected_ratio = _log_ratios(logps, "cdpo")
    logits = beta * (chosen_ratio - rejected_ratio)  # (B,)
    eps = label_smoothing
    losses = -(1.0 - eps) * F.logsigmoid(logits) - eps * F.logsigmoid(-logits)
    return _output(losses, beta * chosen_ratio, beta * rejected_ratio, logps)


def robust_loss(
    logps: PreferenceLogps, beta: float, label_smoothing: float = 0.0, gamma: float = 0.0
) -> LossOutput:
    """Robust DPO (Chowdhury et al.): (-(1-ε) log σ(β h) + ε log σ(-β h)) / (1 - 2ε)."""
    eps = label_smoothing
    if not 0.0 <= eps < 0.5:
        raise ValueError(f"the 'robust' loss needs 0 <= label_smoothing < 0.5, got {eps}")
    chosen_ratio, rejected_ratio = _log_ratios(logps, "robust")
    logits = beta * (chosen_ratio - rejected_ratio)  # (B,)
    losses = (-(1.0 - eps) * F.logsigmoid(logits) + eps * F.logsigmoid(-logits)) / (1.0 - 2 * eps)
    return _output(losses, beta * chosen_ratio, beta * rejected_ratio, logps)


def hinge_loss(
    logps: PreferenceLogps, beta: float, label_smoothing: float = 0.0, gamma: float = 0.0
) -> LossOutput:
    """SLiC hinge: max(0, 1 - β h)."""
    chosen_ratio, rejected_ratio = _log_ratios(logps, "hinge")
    losses = torch.relu(1.0 - beta * (chosen_ratio - rejected_ratio))  # (B,)
    return _output(losses, beta * chosen_ratio, beta * rejected_ratio, logps)


def ipo_loss(
    logps: PreferenceLogps, beta: float, label_smoothing: float = 0.0, gamma: float = 0.0
) -> LossOutput:
    """IPO: (h - 1/(2β))² with length-averaged logps (β is IPO's τ)."""
    chosen_ratio, rejected_ratio = _log_ratios(logps, "ipo", length_average=True)
    losses = (chosen_ratio - rejected_ratio - 1.0 / (2.0 * beta)) ** 2  # (B,)
    return _output(losses, beta * chosen_ratio, beta * rejected_ratio, logps)


def simpo_loss(
    logps: PreferenceLogps, beta: float, label_smoothing: float = 0.0, gamma: float = 0.0
) -> LossOutput:
    """SimPO: -log σ(β/|y_w| log π(y_w) - β/|y_l| log π(y_l) - γ); no reference model."""
    chosen_lengths = _need(logps.chosen_lengths, "chosen_lengths", "simpo")
    rejected_lengths = _need(logps.rejected_lengths, "rejected_lengths", "simpo")
    rewards_chosen = beta * logps.chosen.float() / chosen_lengths  # (B,)
    rewards_rejected = beta * logps.rejected.float() / rejected_lengths  # (B,)
    losses = -F.logsigmoid(rewards_chosen - rewards_rejected - gamma)  # (B,)
    return _output(losses, rewards_chosen, rewards_rejected, logps)


def orpo_loss(
    logps: PreferenceLogps, beta: float, label_smoothing: float = 0.0, gamma: float = 0.0
) -> LossOutput:
    """ORPO in the DPO signature (β is ORPO's λ; no reference); see losses/orpo.py."""
    return odds_ratio_loss(
        logps.chosen,
        logps.rejected,
        _need(logps.chosen_lengths, "chosen_lengths", "orpo"),
        _need(logps.rejected_lengths, "rejected_lengths", "orpo"),
        beta,
    )


DPO_LOSSES: dict[str, Callable[..., LossOutput]] = {
    "sigmoid": sigmoid_loss,
    "cdpo": cdpo_loss,
    "robust": robust_loss,
    "orpo": orpo_loss,
    "hinge": hinge_loss,
    "ipo": ipo_loss,
    "simpo": simpo_loss,
}
