"""Bradley-Terry loss against hand-computed values."""

import math

import torch

from posttrain.losses.reward import bradley_terry_loss


def softplus(x: float) -> float:
    return math.log(1 + math.exp(x))  # -log σ(-x)


def test_bradley_terry_plain():
    chosen = torch.tensor([2.0, 0.0], requires_grad=True)
    rejected = torch.tensor([1.0, 0.5])
    out = bradley_terry_loss(chosen, rejected)
    # diffs 1 and -0.5: -log σ(1) = ln(1 + e^-1), -log σ(-0.5) = ln(1 + e^0.5)
    assert math.isclose(out.total.item(), softplus(-1) + softplus(0.5), rel_tol=1e-6)
    assert out.units.item() == 2.0
    m = {k: v.item() for k, v in out.metrics.items()}
    assert m["accuracy"] == 0.5  # 2 > 1 yes, 0 > 0.5 no
    assert m["reward_chosen"] == 1.0  # (2 + 0) / 2
    assert m["reward_rejected"] == 0.75  # (1 + 0.5) / 2
    assert m["reward_margin"] == 0.25  # (1 - 0.5) / 2
    # d/dr_w [-log σ(d)] = -σ(-d): -1/(1 + e) and -1/(1 + e^-0.5)
    out.total.backward()
    expected = [-1 / (1 + math.e), -1 / (1 + math.exp(-0.5))]
    torch.testing.assert_close(chosen.grad, torch.tensor(expected))


def test_bradley_terry_margin_and_centering():
    out = bradley_terry_loss(
        torch.tensor([2.0, 0.0]),
        torch.tensor([1.0, 0.5]),
        margin=torch.tensor([0.5, 0.0]),
        centering_coef=0.01,
    )
    # pair 0: -log σ(1 - 0.5) + 0.01 (2 + 1)^2 = ln(1 + e^-0.5) + 0.09
    # pair 1: -log σ(-0.5 - 0) + 0.01 (0 + 0.5)^2 = ln(1 + e^0.5) + 0.0025
    expected = softplus(-0.5) + 0.09 + softplus(0.5) + 0.0025
    assert math.isclose(out.total.item(), expected, rel_tol=1e-6)
    assert out.metrics["accuracy"].item() == 0.5  # accuracy ignores the margin
