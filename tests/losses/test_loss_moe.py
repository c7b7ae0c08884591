"""MoE router losses and load diagnostics against hand-computed values.

Router logits are written as log-probabilities, so softmax gives the listed probabilities back.
"""

import math

import pytest
import torch

from posttrain.losses.moe import (
    aux_free_bias_update,
    expert_load,
    load_balancing_loss,
    load_stats,
    router_entropy,
    router_z_loss,
)

# top-1, E = 2: token probs (.25, .75), (.25, .75), (.75, .25) -> experts 1, 1, 0
TOP1 = torch.tensor([[0.25, 0.75], [0.25, 0.75], [0.75, 0.25]]).log()
# top-2, E = 3: token probs (.5, .3, .2) -> {0, 1}; (.1, .6, .3) -> {1, 2}
TOP2 = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]]).log()


def test_load_balancing_top1_is_switch_formula():
    # f = (1/3, 2/3); P = ((.25 + .25 + .75)/3, (.75 + .75 + .25)/3) = (1.25/3, 1.75/3)
    # 2 * (1/3 * 1.25/3 + 2/3 * 1.75/3) = 2 * 4.75 / 9
    loss = load_balancing_loss(TOP1, num_experts=2, top_k=1)
    assert loss.item() == pytest.approx(9.5 / 9)


def test_load_balancing_top2_and_layer_average():
    # slots: expert 0 once, 1 twice, 2 once of 2 tokens * 2 = 4 -> f = (.25, .5, .25)
    # P = ((.5 + .1)/2, (.3 + .6)/2, (.2 + .3)/2) = (.3, .45, .25)
    # 3 * (.25 * .3 + .5 * .45 + .25 * .25) = 3 * .3625 = 1.0875
    top2 = 3 * 0.3625
    assert load_balancing_loss(TOP2, 3, 2).item() == pytest.approx(top2)
    # uniform router: f = P = 1/3 -> exactly 1 (for any k)
    uniform = torch.zeros(2, 3)
    uniform[0, 0] = uniform[1, 1] = 1e-3  # break top-k ties; P stays ~1/3
    assert load_balancing_loss(uniform, 3, 2).item() == pytest.approx(1.0, abs=1e-3)
    both = load_balancing_loss((TOP2, uniform), 3, 2)  # averaged over layers
    assert both.item() == pytest.approx((top2 + 1.0) / 2, abs=1e-3)


def test_load_balancing_token_mask_and_gradient():
    logits = TOP1.clone().requires_grad_(True)
    # drop token 2: f = (0, 1), P = (.25, .75) -> 2 * .75 = 1.5
    loss = load_balancing_loss(logits, 2, 1, token_mask=torch.tensor([1, 1, 0]))
    assert loss.item() == pytest.approx(1.5)
    loss.backward()  # differentiable through P; the dropped token gets no gradient
    assert logits.grad[:2].abs().sum() > 0
    assert (logits.grad[2] == 0).all()


def test_router_z_loss():
    logits = torch.tensor([[0.0, math.log(3)], [1.0, 1.0], [50.0, 50.0]])
    # logsumexp: ln(1 + 3) = ln 4; ln(2e) = 1 + ln 2; the masked-out row is ignored
    expected = (math.log(4) ** 2 + (1 + math.log(2)) ** 2) / 2
    out = router_z_loss(logits, token_mask=torch.tensor([1, 1, 0]))
    assert out.item() == pytest.approx(expected)
    assert router_z_loss((logits[:2], logits[:2])).item() == pytest.approx(expected)


def test_expert_load_and_stats():
    load = expert_load(TOP2, top_k=2)
    torch.testing.assert_close(load, torch.tensor([0.25, 0.5, 0.25]))
    # pooled over layers: TOP1 has 1 + 2 of 3 slots on experts 0 and 1, counted twice
    torch.testing.assert_close(expert_load((TOP1, TOP1), top_k=1), torch.tensor([1 / 3, 2 / 3]))
    stats = load_stats(load)
    # mean 1/3; deviations (-1/12, 1/6, -1/12); population var (1 + 4 + 1)/144/3 = 1/72
    assert stats["min"].item() == 0.25 and stats["max"].item() == 0.5
    assert stats["cv"].item() == pytest.approx(math.sqrt(1 / 72) * 3)


def test_router_entropy():
    logits = torch.tensor([[0.0, math.log(3)], [2.0, 2.0]])
    h0 = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert router_entropy(logits).item() == pytest.approx((h0 + math.log(2)) / 2)


def test_aux_free_bias_update():
    bias = torch.tensor([0.0, 0.1, -0.1, 0.0])
    load = torch.tensor([0.4, 0.2, 0.15, 0.25])  # mean 0.25
    # overloaded -> -γ; underloaded -> +γ; exactly at the mean -> unchanged
    out = aux_free_bias_update(bias, load, gamma=0.001)
    torch.testing.assert_close(out, torch.tensor([-0.001, 0.101, -0.099, 0.0]))
    assert bias.tolist() == pytest.approx([0.0, 0.1, -0.1, 0.0])  # not modified in place
