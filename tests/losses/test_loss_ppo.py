"""PPO pieces: GAE on a ragged batch, policy/value losses, KL-shaped rewards, KL controllers."""

import math
import random

import pytest
import torch

from posttrain.losses.ppo import (
    AdaptiveKLController,
    FixedKLController,
    gae,
    kl_penalized_rewards,
    ppo_policy_loss,
    ppo_value_loss,
)


def test_gae_hand_computed():
    rewards = torch.tensor([[0.0, 1.0], [2.0, 99.0]])
    values = torch.tensor([[0.5, 0.2], [0.5, 99.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    # row 0: δ1 = 1 + 0.9*0 - 0.2 = 0.8 = A1; δ0 = 0 + 0.9*0.2 - 0.5 = -0.32,
    #        A0 = -0.32 + 0.72 * 0.8 = 0.256; R = A + V = (0.756, 1.0)
    # row 1: one token, V after it is 0: A0 = 2 - 0.5 = 1.5, R0 = 2; padding -> 0
    torch.testing.assert_close(adv, torch.tensor([[0.256, 0.8], [1.5, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[0.756, 1.0], [2.0, 0.0]]))


def python_gae(rewards: list, values: list, gamma: float, lam: float) -> tuple[list, list]:
    """Textbook GAE over one episode's valid steps, V after the last step = 0."""
    n, running, adv = len(rewards), 0.0, [0.0] * len(rewards)
    for t in reversed(range(n)):
        next_value = values[t + 1] if t + 1 < n else 0.0
        running = rewards[t] + gamma * next_value - values[t] + gamma * lam * running
        adv[t] = running
    return adv, [a + v for a, v in zip(adv, values, strict=True)]


def test_gae_matches_python_loop_on_ragged_batch():
    rng = random.Random(0)
    lengths, width = [6, 3, 1, 0, 5], 6
    rewards = [[rng.uniform(-1, 1) for _ in range(width)] for _ in lengths]
    values = [[rng.uniform(-1, 1) for _ in range(width)] for _ in lengths]
    mask = [[int(t < n) for t in range(width)] for n in lengths]
    adv, ret = gae(torch.tensor(rewards), torch.tensor(values), torch.tensor(mask), 0.99, 0.95)
    for row, n in enumerate(lengths):
        want_adv, want_ret = python_gae(rewards[row][:n], values[row][:n], 0.99, 0.95)
        pad = [0.0] * (width - n)
        torch.testing.assert_close(adv[row], torch.tensor(want_adv + pad))
        torch.testing.assert_close(ret[row], torch.tensor(want_ret + pad))


def test_ppo_policy_loss():
    ratios = torch.tensor([[1.5, 0.7, 1.0], [1.1, 3.0, 3.0]])
    old = torch.full((2, 3), -2.0)
    advantages = torch.tensor([[1.0, -1.0, 2.0], [-0.5, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    out = ppo_policy_loss(old + ratios.log(), old, advantages, mask, clip_eps=0.2)
    # max(-Aρ, -A clip(ρ)): (1.5, A=1) -> max(-1.5, -1.2) = -1.2 (clipped)
    # (0.7, A=-1) -> max(0.7, 0.8) = 0.8 (clipped); (1.0, A=2) -> -2; (1.1, A=-0.5) -> 0.55
    assert math.isclose(out.total.item(), -1.2 + 0.8 - 2.0 + 0.55, rel_tol=1e-5)
    assert out.units.item() == 4.0
    m = {k: v.item() for k, v in out.metrics.items()}
    assert m["clip_fraction"] == 0.5
    logs = [math.log(r) for r in (1.5, 0.7, 1.0, 1.1)]
    assert m["approx_kl"] == pytest.approx(sum(0.5 * x * x for x in logs) / 4, rel=1e-5)
    k3 = sum((r - 1) - math.log(r) for r in (1.5, 0.7, 1.0, 1.1)) / 4
    assert m["approx_kl_k3"] == pytest.approx(k3, rel=1e-4)
    assert m["ratio_mean"] == pytest.approx((1.5 + 0.7 + 1.0 + 1.1) / 4)


def test_ppo_value_loss():
    values = torch.tensor([[1.0, 2.0, 5.0]])
    old_values = torch.tensor([[0.5, 2.0, 0.0]])
    returns = torch.tensor([[2.0, 1.0, 0.0]])
    mask = torch.tensor([[1, 1, 0]])
    out = ppo_value_loss(values, old_values, returns, mask, clip_eps_value=0.2)
    # token 0: (1 - 2)^2 = 1; clipped 0.5 + 0.2 = 0.7 -> (0.7 - 2)^2 = 1.69; ½ max = 0.845
    # token 1: no change from old: (2 - 1)^2 = 1 both -> 0.5
    assert math.isclose(out.total.item(), 0.845 + 0.5, rel_tol=1e-6)
    assert out.units.item() == 2.0
    assert out.metrics["value_clip_fraction"].item() == 0.5
    # R - V = (1, -1): var 1; R = (2, 1): var 0.25 -> 1 - 1 / 0.25 = -3
    assert out.metrics["explained_variance"].item() == pytest.approx(-3.0)


LOGPROBS = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, 7.0]])
REF = torch.tensor([[-1.5, -2.0, -2.0], [-2.0, -1.0, 0.0]])
MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])
SCORES = torch.tensor([1.0, 2.0])


def test_kl_penalized_rewards_k1():
    out = kl_penalized_rewards(SCORES, LOGPROBS, REF, MASK, kl_coef=0.1)
    # k1 = logπ - logπ_ref = (0.5, 0, -1 | 1, 0, pad); -0.1 k1, score on the last valid token
    torch.testing.assert_close(out, torch.tensor([[-0.05, 0.0, 1.1], [-0.1, 2.0, 0.0]]))


def test_kl_penalized_rewards_k3():
    out = kl_penalized_rewards(SCORES, LOGPROBS, REF, MASK, kl_coef=0.1, estimator="k3")
    # d = logπ_ref - logπ = (-0.5, 0, 1 | -1, 0); k3 = e^d - d - 1
    k3 = [math.exp(-0.5) - 0.5, 0.0, math.e - 2, math.exp(-1), 0.0]
    expected = [[-0.1 * k3[0], 0.0, -0.1 * k3[2] + 1.0], [-0.1 * k3[3], 2.0, 0.0]]
    torch.testing.assert_close(out, torch.tensor(expected))
    with pytest.raises(ValueError, match="estimator"):
        kl_penalized_rewards(SCORES, LOGPROBS, REF, MASK, 0.1, estimator="k2")


def test_adaptive_kl_controller():
    ctl = AdaptiveKLController(init_kl_coef=0.2, target=6.0, horizon=10000)
    ctl.update(current_kl=9.0, n_steps=256)  # 9/6 - 1 = 0.5 -> clipped to 0.2
    assert ctl.value == pytest.approx(0.2 * (1 + 0.2 * 256 / 10000))
    before = ctl.value
    ctl.update(current_kl=6.6, n_steps=256)  # 6.6/6 - 1 = 0.1, inside the clip
    assert ctl.value == pytest.approx(before * (1 + 0.1 * 256 / 10000))
    before = ctl.value
    ctl.update(current_kl=1.0, n_steps=100)  # 1/6 - 1 -> clipped to -0.2
    assert ctl.value == pytest.approx(before * (1 - 0.2 * 100 / 10000))
    restored = AdaptiveKLController(init_kl_coef=0.5, target=6.0, horizon=10000)
    restored.load_state_dict(ctl.state_dict())
    assert restored.value == ctl.value


def test_fixed_kl_controller():
    ctl = FixedKLController(0.05)
    ctl.update(current_kl=100.0, n_steps=1000)
    assert ctl.value == 0.05
    other = FixedKLController(1.0)
    other.load_state_dict(ctl.state_dict())
    assert other.value == 0.05
