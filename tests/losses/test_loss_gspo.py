"""GSPO, GSPO-token and CISPO against hand-computed values and gradients (spec §13)."""

import math

import pytest
import torch

from posttrain.losses.grpo import grpo_policy_loss
from posttrain.losses.gspo import cispo_loss, gspo_loss, gspo_token_loss
from posttrain.losses.policy import CLIP_DEFAULTS, POLICY_LOSSES

BASE = torch.tensor(
    [[-1.0, -2.0, -3.0], [-0.5, -1.5, -0.7], [-2.0, -1.0, -1.0], [-0.3, -0.4, -0.5]]
)
# log π_θ/π_old per token; padding (mask 0) carries a large ratio that must be ignored
LOG_RATIOS = torch.tensor([[0.2, -0.1, 5.0], [0.3, 0.3, 0.3], [-0.5, 5.0, 5.0], [0.3, 0.3, 0.3]])
MASK = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 1]])
ADV = torch.tensor([1.0, 2.0, -1.0, -2.0])
EPS = 0.1


def _inputs():
    logprobs = (BASE + LOG_RATIOS).requires_grad_(True)
    return logprobs, BASE.clone()


def test_gspo_sequence_ratio_clipping_value_and_gradient():
    logprobs, old = _inputs()
    out = gspo_loss(logprobs, old, ADV, MASK, EPS, EPS)
    # s_i = exp(mean over the sequence's tokens of the log-ratio):
    s0, s1, s2, s3 = math.exp(0.05), math.exp(0.3), math.exp(-0.5), math.exp(0.3)
    # seq 0: Â=+1, s0=1.051 inside [0.9, 1.1]: ℓ = s0
    # seq 1: Â=+2, s1=1.350 > 1.1: ℓ = min(2 s1, 2·1.1) = 2.2 (clipped, no gradient)
    # seq 2: Â=-1, s2=0.607 < 0.9: ℓ = min(-s2, -0.9) = -0.9 (clipped, no gradient)
    # seq 3: Â=-2, s3=1.350: ℓ = min(-2 s3, -2.2) = -2 s3 (unclipped: the min keeps it)
    expected = -(s0 + 2.2 - 0.9 - 2 * s3)
    torch.testing.assert_close(out.total, torch.tensor(expected))
    assert out.units == 4
    out.total.backward()
    # ∂(-s_i Â_i)/∂log π_{i,t} = -Â_i s_i / |o_i| on the sequence's tokens
    grad = torch.zeros(4, 3)
    grad[0, :2] = -s0 / 2
    grad[3, :] = 2 * s3 / 3
    torch.testing.assert_close(logprobs.grad, grad)
    torch.testing.assert_close(out.metrics["clip_fraction"], torch.tensor(0.5))
    torch.testing.assert_close(out.metrics["ratio_mean"], torch.tensor((s0 + s1 + s2 + s3) / 4))


def test_gspo_token_equals_gspo_with_sequence_advantages():
    a, old = _inputs()
    b, _ = _inputs()
    seq = gspo_loss(a, old, ADV, MASK, EPS, EPS)
    tok = gspo_token_loss(b, old, ADV, MASK, EPS, EPS)
    torch.testing.assert_close(seq.total, tok.total)
    seq.total.backward()
    tok.total.backward()
    torch.testing.assert_close(a.grad, b.grad)


def test_gspo_token_per_token_advantages():
    old = torch.tensor([[-1.0, -1.0]])
    logprobs = (old + torch.tensor([[0.1, -0.1]])).requires_grad_(True)  # s = exp(0) = 1
    adv = torch.tensor([[1.0, -1.0]])
    out = gspo_token_loss(logprobs, old, adv, torch.ones(1, 2), EPS, EPS)
    # ℓ_t = s·Â_t = (1, -1), loss -(1/2)(1 - 1) = 0; ∂/∂log π_t = -s Â_t / 2
    torch.testing.assert_close(out.total, torch.tensor(0.0))
    out.total.backward()
    torch.testing.assert_close(logprobs.grad, torch.tensor([[-0.5, 0.5]]))
    with pytest.raises(ValueError, match="gspo_token"):
        gspo_loss(logprobs, old, adv, torch.ones(1, 2))


def test_cispo_clips_only_the_detached_weight():
    old = torch.tensor([[-1.5, -4.0, -1.0], [0.5, -1.0, -1.0]])
    logprobs = torch.tensor([[-1.0, -2.0, 9.0], [-0.5, -1.0, -1.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    adv = torch.tensor([1.0, -1.0])
    out = cispo_loss(logprobs, old, adv, mask, eps_low=1.0, eps_high=4.0)
    # ratios e^0.5 = 1.649, e^2 = 7.389 -> capped at 1 + 4 = 5, e^-1 = 0.368 (no lower clip)
    w = [math.exp(0.5), 5.0, math.exp(-1.0)]
    expected = -(w[0] * 1 * -1.0 + w[1] * 1 * -2.0 + w[2] * -1 * -0.5)
    torch.testing.assert_close(out.total, torch.tensor(expected))
    assert out.units == 3  # completion tokens
    out.total.backward()
    # every token keeps a gradient -sg[w] Â, also the capped one (PPO clipping would zero it)
    torch.testing.assert_close(logprobs.grad, torch.tensor([[-w[0], -w[1], 0.0], [w[2], 0.0, 0.0]]))
    torch.testing.assert_close(out.metrics["clip_fraction"], torch.tensor(1 / 3))


def test_token_weights_scale_the_policy_term_only():
    old = torch.tensor([[-1.0, -1.0]])
    logprobs = old.clone().requires_grad_(True)  # ρ = 1
    ref = torch.tensor([[-1.0 + math.log(2), -1.0]])
    weights = torch.tensor([[2.0, 0.5]])
    out = grpo_policy_loss(
        logprobs,
        old,
        torch.tensor([1.0]),
        torch.ones(1, 2),
        "dapo",
        beta=0.1,
        ref_logprobs=ref,
        token_weights=weights,
    )
    kl0 = 1 - math.log(2)  # k3 with log(π_ref/π) = ln 2
    torch.testing.assert_close(out.total, torch.tensor(-(2.0 - 0.1 * kl0) - 0.5))


def test_registry_covers_every_loss_type_with_defaults():
    assert set(POLICY_LOSSES) == set(CLIP_DEFAULTS)
    assert CLIP_DEFAULTS["gspo"] == (3e-4, 4e-4)
    logprobs, old = _inputs()
    for name, fn in POLICY_LOSSES.items():
        low, high = CLIP_DEFAULTS[name]
        out = fn(
            logprobs=logprobs,
            old_logprobs=old,
            advantages=ADV,
            completion_mask=MASK,
            eps_low=low,
            eps_high=high,
            max_completion_length=3,
        )
        assert torch.isfinite(out.total), name
