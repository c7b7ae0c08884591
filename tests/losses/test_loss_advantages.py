"""RLOO and REINFORCE++ advantages, and the TIS / MIS rollout corrections (spec §13)."""

import math
import statistics

import pytest
import torch

from posttrain.losses.advantages import (
    ADVANTAGE_ESTIMATORS,
    reinforce_pp_advantages,
    rloo_advantages,
)
from posttrain.losses.rollout_correction import ROLLOUT_CORRECTIONS


def test_rloo_leave_one_out_baseline():
    rewards = torch.tensor([1.0, 0.0, 2.0, 3.0, 3.0, 3.0])
    # group 0: baselines (0+2)/2 = 1, (1+2)/2 = 1.5, (1+0)/2 = 0.5; group 1: all equal
    torch.testing.assert_close(
        rloo_advantages(rewards, 3), torch.tensor([0.0, -1.5, 1.5, 0.0, 0.0, 0.0])
    )
    with pytest.raises(ValueError, match="group_size >= 2"):
        rloo_advantages(rewards, 1)
    assert ADVANTAGE_ESTIMATORS["rloo"] is rloo_advantages


def test_reinforce_pp_kl_in_reward_returns_and_global_normalisation():
    rewards = torch.tensor([1.0, 0.0])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    logprobs = torch.tensor([[-1.0, -1.0, 0.0], [-2.0, 0.0, 0.0]])
    ref = torch.tensor([[-1.5, -1.0, 0.0], [-1.0, 0.0, 0.0]])
    adv = reinforce_pp_advantages(
        rewards, 2, mask, kl_coef=0.1, logprobs=logprobs, ref_logprobs=ref
    )
    # k1 = log π - log π_ref: (0.5, 0), (-1); token rewards -0.1 k1 plus r on the last token:
    # seq 0: (-0.05, 0 + 1), seq 1: (0.1 + 0); returns (γ = 1): (0.95, 1.0), (0.1)
    returns = [0.95, 1.0, 0.1]
    mean, std = statistics.mean(returns), statistics.stdev(returns)  # unbiased, as masked_whiten
    expected = torch.tensor(
        [[(0.95 - mean) / std, (1.0 - mean) / std, 0.0], [(0.1 - mean) / std, 0.0, 0.0]]
    )
    torch.testing.assert_close(adv, expected, atol=1e-5, rtol=1e-5)


def test_reinforce_pp_statistics_are_global_over_processes():
    rewards = torch.tensor([1.0, 0.0, 0.5])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 0]])
    # two processes holding the same rows == one process holding both copies
    two = reinforce_pp_advantages(rewards, 1, mask, all_reduce=lambda x: 2 * x)
    one = reinforce_pp_advantages(torch.cat([rewards, rewards]), 1, torch.cat([mask, mask]))
    torch.testing.assert_close(two, one[:3])
    alone = reinforce_pp_advantages(rewards, 1, mask)
    assert not torch.allclose(two, alone)  # n-1 in the variance differs: the reduction is used


def test_tis_caps_weights_and_mis_masks_tokens():
    old = torch.zeros(1, 4)
    rollout = -torch.tensor([[math.log(3.0), math.log(0.4), 0.1, 9.0]])  # ratios 3, 0.4, e^0.1
    mask = torch.tensor([[1, 1, 1, 0]])
    weights, new_mask, metrics = ROLLOUT_CORRECTIONS["tis"](old, rollout, mask, 2.0)
    torch.testing.assert_close(weights, torch.tensor([[2.0, 0.4, math.exp(0.1), 0.0]]))
    assert torch.equal(new_mask, mask)
    diff = (math.log(3.0) + abs(math.log(0.4)) + 0.1) / 3
    torch.testing.assert_close(metrics["rollout_logp_abs_diff"], torch.tensor(diff))
    torch.testing.assert_close(metrics["rollout_corrected_fraction"], torch.tensor(1 / 3))

    weights, new_mask, metrics = ROLLOUT_CORRECTIONS["mis"](old, rollout, mask, 2.0)
    assert weights is None  # ratios 3 and 0.4 leave [1/2, 2]: dropped
    assert new_mask.tolist() == [[False, False, True, False]]
    torch.testing.assert_close(metrics["rollout_corrected_fraction"], torch.tensor(2 / 3))

    weights, new_mask, metrics = ROLLOUT_CORRECTIONS["none"](old, rollout, mask, 2.0)
    assert weights is None and torch.equal(new_mask, mask)
    torch.testing.assert_close(metrics["rollout_logp_abs_diff"], torch.tensor(diff))
