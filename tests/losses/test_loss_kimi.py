"""Kimi k1.5 loss, its gradient relation to the paper's closed form, and the length penalty."""

import math

import pytest
import torch

from posttrain.losses.kimi import kimi_length_penalty, kimi_loss

# two problems, k = 2: rewards (1, 0 | 1, 1) -> r̄ = 0.5, 1 -> r - r̄ = (0.5, -0.5, 0, 0)
# log-ratios log π_θ - log π_θi = (0.1, -0.2, 0, 0.3), τ = 0.5
# residuals r - r̄ - τ ℓ = (0.45, -0.4, 0, -0.15)
REWARDS = torch.tensor([1.0, 0.0, 1.0, 1.0])
REF = torch.tensor([-5.0, -6.0, -7.0, -8.0])
LOG_RATIO = [0.1, -0.2, 0.0, 0.3]
TAU = 0.5
RESIDUALS = [0.45, -0.4, 0.0, -0.15]
CENTRED = [0.5, -0.5, 0.0, 0.0]


def test_kimi_loss_value():
    out = kimi_loss(REF + torch.tensor(LOG_RATIO), REF, REWARDS, group_size=2, tau=TAU)
    # 0.45^2 + 0.4^2 + 0 + 0.15^2 = 0.2025 + 0.16 + 0.0225 = 0.385, over 4 samples
    assert math.isclose(out.total.item(), 0.385, rel_tol=1e-5)
    assert out.units.item() == 4.0
    assert out.metrics["reward_mean"].item() == 0.75
    assert out.metrics["log_ratio_mean"].item() == pytest.approx(0.05, abs=1e-6)


def test_kimi_gradient_is_minus_two_tau_times_paper_gradient():
    logprobs = (REF + torch.tensor(LOG_RATIO)).requires_grad_(True)
    out = kimi_loss(logprobs, REF, REWARDS, group_size=2, tau=TAU)
    (out.total / out.units).backward()
    # ∂L/∂logπ_j = (2/N) residual_j (-τ) = -0.25 residual_j
    hand = [-0.25 * r for r in RESIDUALS]  # (-0.1125, 0.1, 0, 0.0375)
    torch.testing.assert_close(logprobs.grad, torch.tensor(hand))
    # paper: g_j = (1/k) [(r_j - r̄) - (τ/2) · 2 ℓ_j] (∇(ℓ²) = 2ℓ∇ℓ), here over all N = 4
    paper = [(a - (TAU / 2) * 2 * lr) / 4 for a, lr in zip(CENTRED, LOG_RATIO, strict=True)]
    torch.testing.assert_close(logprobs.grad, torch.tensor([-2 * TAU * g for g in paper]))


def test_kimi_length_penalty():
    lengths = torch.tensor([10, 20, 30, 10, 30, 20, 7, 7, 7])
    correct = torch.tensor([1, 0, 1, 0, 1, 0, 1, 0, 1], dtype=torch.bool)
    # group 0: λ = 0.5 - (0, 10, 20)/20 = (0.5, 0, -0.5); correct, wrong -> min(0, 0), correct
    # group 1: λ = (0.5, -0.5, 0); wrong -> min(0, 0.5) = 0, correct -0.5, wrong 0
    # group 2: all lengths equal -> 0
    expected = [0.5, 0.0, -0.5, 0.0, -0.5, 0.0, 0.0, 0.0, 0.0]
    out = kimi_length_penalty(lengths, correct, group_size=3)
    torch.testing.assert_close(out, torch.tensor(expected))
