"""KTO and ORPO against hand-computed values and gradients (spec §14)."""

import math

import pytest
import torch

from posttrain.losses.dpo import DPO_LOSSES, PreferenceLogps
from posttrain.losses.kto import kto_loss
from posttrain.losses.orpo import log_odds, odds_ratio_loss


def sigma(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_kto_value_gradient_and_kl_without_gradient():
    policy = torch.tensor([-5.0, -6.0, -7.0], requires_grad=True)
    ref = torch.tensor([-6.0, -6.0, -6.0])
    kl_policy = torch.tensor([-4.0, -5.0, -6.0], requires_grad=True)
    kl_ref = torch.tensor([-5.0, -5.5, -6.0])
    desirable = torch.tensor([True, False, True])
    out = kto_loss(policy, ref, kl_policy, kl_ref, desirable, beta=0.1, undesirable_weight=2.0)
    # KL estimate: mean(1, 0.5, 0) = 0.5, z_ref = β·0.5 = 0.05; h = β·(1, 0, -1)
    h, z = [0.1, 0.0, -0.1], 0.05
    expected = (1 - sigma(h[0] - z)) + 2 * (1 - sigma(z - h[1])) + (1 - sigma(h[2] - z))
    torch.testing.assert_close(out.total, torch.tensor(expected))
    assert out.units == 3
    torch.testing.assert_close(out.metrics["kl"], torch.tensor(0.5))
    out.total.backward()

    def d(x):  # σ'(x)
        return sigma(x) * (1 - sigma(x))

    grad = [-0.1 * d(h[0] - z), 2 * 0.1 * d(z - h[1]), -0.1 * d(h[2] - z)]
    torch.testing.assert_close(policy.grad, torch.tensor(grad))
    assert kl_policy.grad is None  # z_ref is a constant baseline


def test_kto_kl_is_clamped_at_zero_and_reduced_over_processes():
    policy, ref = torch.tensor([-1.0]), torch.tensor([-1.0])
    out = kto_loss(
        policy, ref, torch.tensor([-3.0]), torch.tensor([-1.0]), torch.tensor([True]), 1.0
    )
    assert out.metrics["kl"].item() == 0.0  # negative estimate -> 0
    torch.testing.assert_close(out.total, torch.tensor(0.5))  # 1 - σ(0)
    # a second process whose mismatched pairs average +3: global mean (-2 + 3·1) / 2 = 0.5
    out = kto_loss(
        policy, ref, torch.tensor([-3.0]), torch.tensor([-1.0]), torch.tensor([True]), 1.0,
        all_reduce=lambda x: x + (3.0 if x.item() != 1.0 else 1.0),
    )  # fmt: skip
    torch.testing.assert_close(out.metrics["kl"], torch.tensor(0.5))


def test_log_odds_is_stable():
    lp = torch.tensor([-2.0, -1e-9, -50.0])
    p = math.exp(-2.0)
    torch.testing.assert_close(log_odds(lp)[0], torch.tensor(math.log(p / (1 - p))))
    assert torch.isfinite(log_odds(lp)).all()


def test_orpo_value_and_gradient():
    chosen = torch.tensor([-10.0, -20.0], requires_grad=True)
    rejected = torch.tensor([-12.0, -18.5])
    lengths_c, lengths_r = torch.tensor([5.0, 10.0]), torch.tensor([4.0, 6.0])
    out = odds_ratio_loss(chosen, rejected, lengths_c, lengths_r, lam=0.1)
    lw, ll = [-2.0, -2.0], [-3.0, -18.5 / 6]

    def lo(x):
        return x - math.log(1 - math.exp(x))

    x = [lo(lw[i]) - lo(ll[i]) for i in range(2)]
    expected = sum(-lw[i] - 0.1 * math.log(sigma(x[i])) for i in range(2))
    torch.testing.assert_close(out.total, torch.tensor(expected))
    out.total.backward()
    # d/dℓ_w = -1 - λ σ(-x) · dlo/dℓ, dlo/dℓ = 1 / (1 - e^ℓ); dℓ/dsum = 1/|y_w|
    grad = [
        (-1 - 0.1 * sigma(-x[i]) / (1 - math.exp(lw[i]))) / lengths_c[i].item() for i in range(2)
    ]
    torch.testing.assert_close(chosen.grad, torch.tensor(grad))
    # through the DPO registry: β is λ, no reference needed
    logps = PreferenceLogps(chosen.detach(), rejected, None, None, lengths_c, lengths_r)
    via_dpo = DPO_LOSSES["orpo"](logps, beta=0.1)
    torch.testing.assert_close(via_dpo.total, out.total.detach())
    with pytest.raises(ValueError, match="chosen_lengths"):
        DPO_LOSSES["orpo"](PreferenceLogps(chosen, rejected), beta=0.1)
