"""GRPO advantages, k3 KL, the three loss aggregations and the DAPO overlong penalty."""

import math

import pytest
import torch

from posttrain.losses.grpo import (
    GRPO_LOSS_TYPES,
    group_advantages,
    grpo_policy_loss,
    k3_kl,
    overlong_penalty,
)

REWARDS = torch.tensor([1.0, 0.0, 2.0, 3.0, 3.0, 3.0])  # two groups of G = 3


def test_group_advantages_group_scale_uses_unbiased_std():
    adv = group_advantages(REWARDS, group_size=3, eps=1e-4)
    # group 0: mean 1, deviations (0, -1, 1), unbiased std sqrt((0 + 1 + 1) / 2) = 1
    # (the biased std sqrt(2/3) would give ±1.2247); group 1: all equal -> exactly 0
    d = 1 / (1 + 1e-4)
    torch.testing.assert_close(adv, torch.tensor([0.0, -d, d, 0.0, 0.0, 0.0]))
    assert (adv[3:] == 0).all()


def test_group_advantages_batch_and_none_scales():
    # batch: group means, global unbiased std: mean 2, squared deviations 1+4+0+1+1+1 = 8,
    # var 8 / 5 = 1.6
    d = 1 / (math.sqrt(1.6) + 1e-4)
    batch = group_advantages(REWARDS, group_size=3, scale="batch")
    torch.testing.assert_close(batch, torch.tensor([0.0, -d, d, 0.0, 0.0, 0.0]))
    none = group_advantages(REWARDS, group_size=3, scale="none")  # Dr. GRPO: r - mean only
    torch.testing.assert_close(none, torch.tensor([0.0, -1.0, 1.0, 0.0, 0.0, 0.0]))


def test_group_advantages_edge_cases():
    # 0.1 * 3 / 3 is not exactly 0.1 in floating point; all-equal groups must still give 0
    assert (group_advantages(torch.tensor([0.1, 0.1, 0.1]), 3) == 0).all()
    assert (group_advantages(torch.tensor([0.5, 2.0]), 1) == 0).all()  # G = 1: no baseline
    with pytest.raises(ValueError, match="divisible"):
        group_advantages(torch.zeros(5), 2)
    with pytest.raises(ValueError, match="scale"):
        group_advantages(torch.zeros(4), 2, scale="std")


def test_k3_kl():
    logprobs = torch.tensor([-1.0, -2.0, -0.5])
    ref = torch.tensor([-1.0 + math.log(2), -2.0, -0.5 - 1.0])
    # log(π_ref/π) = ln 2, 0, -1: 2 - ln2 - 1, 0, e^-1 + 1 - 1
    expected = [1 - math.log(2), 0.0, math.exp(-1)]
    torch.testing.assert_close(k3_kl(logprobs, ref), torch.tensor(expected))


# seq 0: Â = +1, mask (1, 1, 0), ratios (1.5, 1.0, [7.0 padding])
# seq 1: Â = -2, mask (1, 1, 1), ratios (0.5, 1.1, 1.0); ε_low = 0.2, ε_high = 0.28
# ℓ seq 0: min(1.5, 1.28) = 1.28 (high clip), 1.0
# ℓ seq 1: min(-1, 0.8 * -2 = -1.6) = -1.6 (low clip), -2.2, -2.0
RATIOS = [[1.5, 1.0, 7.0], [0.5, 1.1, 1.0]]
OLD = torch.full((2, 3), -1.0)
LOGPROBS = OLD + torch.tensor(RATIOS).log()
ADV = torch.tensor([1.0, -2.0])
MASK = torch.tensor([[1, 1, 0], [1, 1, 1]])


@pytest.mark.parametrize(
    ("loss_type", "total", "units"),
    [
        # per-sequence means of -ℓ: -(1.28 + 1) / 2 = -1.14 and (1.6 + 2.2 + 2) / 3 = 5.8 / 3
        ("grpo", -1.14 + 5.8 / 3, 2.0),
        # token sum of -ℓ: -2.28 + 5.8 = 3.52, over G·L_max = 2 * 4 tokens
        ("dr_grpo", 3.52, 8.0),
        # token sum over Σ|o_i| = 5 tokens
        ("dapo", 3.52, 5.0),
    ],
)
def test_grpo_policy_loss_aggregations(loss_type, total, units):
    out = grpo_policy_loss(
        LOGPROBS, OLD, ADV, MASK, loss_type, eps_low=0.2, eps_high=0.28, max_completion_length=4
    )
    assert math.isclose(out.total.item(), total, rel_tol=1e-5)
    assert out.units.item() == units
    m = {k: v.item() for k, v in out.metrics.items()}
    assert m["clip_fraction_low"] == pytest.approx(1 / 5)
    assert m["clip_fraction_high"] == pytest.approx(1 / 5)
    assert m["clip_fraction"] == pytest.approx(2 / 5)
    assert m["ratio_mean"] == pytest.approx((1.5 + 1.0 + 0.5 + 1.1 + 1.0) / 5)
    assert "kl" not in m


def test_grpo_gradient_flows_at_ratio_one():
    # one step per rollout: old = logprobs.detach(), so ρ = 1 but dρ/dlogπ = 1
    logprobs = torch.tensor([[-1.0, -2.0, -3.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0]])
    out = grpo_policy_loss(logprobs, logprobs.detach(), torch.tensor([0.5]), mask, "grpo")
    assert math.isclose(out.total.item(), -0.5, rel_tol=1e-6)  # -(0.5 + 0.5) / 2
    out.total.backward()
    # d/dlogπ of -(1/|o|) Σ ρ Â = -Â / |o| = -0.25 on the two tokens, 0 on padding
    torch.testing.assert_close(logprobs.grad, torch.tensor([[-0.25, -0.25, 0.0]]))


def test_grpo_kl_penalty():
    logprobs = torch.tensor([[-1.0, -2.0]])
    ref = torch.tensor([[-1.0 + math.log(2), -2.0]])  # k3 = (1 - ln 2, 0)
    out = grpo_policy_loss(
        logprobs, logprobs, torch.tensor([0.5]), torch.ones(1, 2), "grpo", beta=0.1,
        ref_logprobs=ref,
    )  # fmt: skip
    # ℓ = (0.5 - 0.1 (1 - ln 2), 0.5); loss = -(sum) / 2
    expected = -(1.0 - 0.1 * (1 - math.log(2))) / 2
    assert math.isclose(out.total.item(), expected, rel_tol=1e-6)
    assert out.metrics["kl"].item() == pytest.approx((1 - math.log(2)) / 2)


def test_grpo_argument_errors():
    args = (LOGPROBS, OLD, ADV, MASK)
    with pytest.raises(ValueError, match="loss_type"):
        grpo_policy_loss(*args, "bnpo")
    with pytest.raises(ValueError, match="max_completion_length"):
        grpo_policy_loss(*args, "dr_grpo")
    with pytest.raises(ValueError, match="ref_logprobs"):
        grpo_policy_loss(*args, "grpo", beta=0.1)
    assert GRPO_LOSS_TYPES == ("grpo", "dr_grpo", "dapo")


def test_overlong_penalty():
    lengths = torch.tensor([5, 6, 7, 8, 10, 11])
    # max 10, cache 4 -> safe length 6: 0, 0, (6-7)/4, (6-8)/4, (6-10)/4 = -1, beyond max -1
    out = overlong_penalty(lengths, max_length=10, cache_length=4)
    torch.testing.assert_close(out, torch.tensor([0.0, 0.0, -0.25, -0.5, -1.0, -1.0]))
