"""DPO-family losses against hand-computed values.

Shared example (B = 2):
  chosen  logps -10, -20   ref -11, -20.5  -> log-ratios  1,  0.5
  rejected logps -12, -18.5 ref -11, -19   -> log-ratios -1,  0.5
  h = (2, 0); completion lengths chosen (5, 10), rejected (4, 6).
"""

import math

import pytest
import torch

from posttrain.losses.dpo import (
    DPO_LOSSES,
    PreferenceLogps,
    cdpo_loss,
    hinge_loss,
    ipo_loss,
    robust_loss,
    sigmoid_loss,
    simpo_loss,
)


def softplus(x: float) -> float:
    return math.log(1 + math.exp(x))  # -log σ(-x)


def make_logps(requires_grad: bool = False, with_ref: bool = True) -> PreferenceLogps:
    return PreferenceLogps(
        chosen=torch.tensor([-10.0, -20.0], requires_grad=requires_grad),
        rejected=torch.tensor([-12.0, -18.5]),
        ref_chosen=torch.tensor([-11.0, -20.5]) if with_ref else None,
        ref_rejected=torch.tensor([-11.0, -19.0]) if with_ref else None,
        chosen_lengths=torch.tensor([5.0, 10.0]),
        rejected_lengths=torch.tensor([4.0, 6.0]),
    )


def test_sigmoid_loss_value_metrics_and_grad():
    logps = make_logps(requires_grad=True)
    out = sigmoid_loss(logps, beta=0.5)
    # β h = (1, 0): -log σ(1) + -log σ(0) = ln(1 + e^-1) + ln 2
    assert math.isclose(out.total.item(), softplus(-1) + math.log(2), rel_tol=1e-6)
    assert out.units.item() == 2.0
    m = {k: v.item() for k, v in out.metrics.items()}
    assert m["rewards_chosen"] == pytest.approx(0.375)  # 0.5 * (1 + 0.5) / 2
    assert m["rewards_rejected"] == pytest.approx(-0.125)  # 0.5 * (-1 + 0.5) / 2
    assert m["rewards_margin"] == pytest.approx(0.5)  # 0.5 * (2 + 0) / 2
    assert m["rewards_accuracy"] == 0.5  # 0.5 > -0.5 yes; 0.25 > 0.25 no
    assert m["logps_chosen"] == -15.0
    assert m["logps_rejected"] == -15.25
    # d/d logπ(y_w) of -log σ(β h) = -β σ(-β h): -0.5 / (1 + e) and -0.5 * 0.5
    out.total.backward()
    torch.testing.assert_close(logps.chosen.grad, torch.tensor([-0.5 / (1 + math.e), -0.25]))


def sigma(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_cdpo_loss_is_label_smoothed():
    logps = make_logps(requires_grad=True)
    out = cdpo_loss(logps, beta=0.5, label_smoothing=0.1)
    # pair 0: 0.9 * ln(1 + e^-1) + 0.1 * ln(1 + e); pair 1 (β h = 0): 0.9 ln2 + 0.1 ln2
    expected = 0.9 * softplus(-1) + 0.1 * softplus(1) + math.log(2)
    assert math.isclose(out.total.item(), expected, rel_tol=1e-6)
    # d/dz = -(1-ε) σ(-z) + ε σ(z), times dz/d logπ(y_w) = β
    out.total.backward()
    grad = [0.5 * (-0.9 * sigma(-1) + 0.1 * sigma(1)), 0.5 * (-0.9 * 0.5 + 0.1 * 0.5)]
    torch.testing.assert_close(logps.chosen.grad, torch.tensor(grad))
    # ε = 0 is plain DPO
    assert math.isclose(
        cdpo_loss(make_logps(), beta=0.5).total.item(), softplus(-1) + math.log(2), rel_tol=1e-6
    )


def test_robust_loss_is_unbiased_chowdhury():
    logps = make_logps(requires_grad=True)
    out = robust_loss(logps, beta=0.5, label_smoothing=0.1)
    # (-(1-ε) log σ(z) + ε log σ(-z)) / (1-2ε) = ((1-ε) softplus(-z) - ε softplus(z)) / (1-2ε)
    # pair 0 (z = 1): (0.9 softplus(-1) - 0.1 softplus(1)) / 0.8; pair 1 (z = 0): 0.8 ln2 / 0.8
    expected = (0.9 * softplus(-1) - 0.1 * softplus(1)) / 0.8 + math.log(2)
    assert math.isclose(out.total.item(), expected, rel_tol=1e-6)
    # d/dz = -((1-ε) σ(-z) + ε σ(z)) / (1-2ε), times β
    out.total.backward()
    grad = [-0.5 * (0.9 * sigma(-1) + 0.1 * sigma(1)) / 0.8, -0.5 * 0.5 / 0.8]
    torch.testing.assert_close(logps.chosen.grad, torch.tensor(grad))
    with pytest.raises(ValueError, match="label_smoothing < 0.5"):
        robust_loss(make_logps(), beta=0.5, label_smoothing=0.5)


def test_hinge_loss():
    out = hinge_loss(make_logps(), beta=0.25)
    # β h = (0.5, 0): max(0, 1 - 0.5) + max(0, 1 - 0) = 1.5
    assert math.isclose(out.total.item(), 1.5, rel_tol=1e-6)
    # β h = (2, 0) at β = 1: the first pair is past the hinge
    assert math.isclose(hinge_loss(make_logps(), beta=1.0).total.item(), 1.0, rel_tol=1e-6)


def test_ipo_loss_uses_length_averaged_logps():
    out = ipo_loss(make_logps(), beta=0.5)
    # averaged log-ratios: chosen 1/5 = 0.2, 0.5/10 = 0.05; rejected -1/4 = -0.25, 0.5/6
    # h = (0.45, 0.05 - 1/12); 1/(2β) = 1: (0.45 - 1)^2 + (0.05 - 1/12 - 1)^2
    expected = (0.45 - 1) ** 2 + (0.05 - 1 / 12 - 1) ** 2
    assert math.isclose(out.total.item(), expected, rel_tol=1e-6)
    # rewards use the same averaged logps: 0.5 * (0.2 + 0.05) / 2
    assert out.metrics["rewards_chosen"].item() == pytest.approx(0.0625)


def test_simpo_loss_is_reference_free():
    out = simpo_loss(make_logps(with_ref=False), beta=2.0, gamma=0.5)
    # β log π / |y|: chosen 2 * (-10/5, -20/10) = (-4, -4); rejected 2 * (-12/4, -18.5/6)
    # logits = (-4 + 6 - 0.5, -4 + 37/6 - 0.5) = (1.5, 5/3)
    expected = softplus(-1.5) + softplus(-5 / 3)
    assert math.isclose(out.total.item(), expected, rel_tol=1e-6)
    assert out.metrics["rewards_chosen"].item() == pytest.approx(-4.0)
    assert out.metrics["rewards_rejected"].item() == pytest.approx((-6 - 37 / 6) / 2)
    assert out.metrics["rewards_accuracy"].item() == 1.0


def test_missing_fields_raise_and_registry_is_complete():
    with pytest.raises(ValueError, match="ref_chosen"):
        sigmoid_loss(make_logps(with_ref=False), beta=0.1)
    no_lengths = PreferenceLogps(
        chosen=torch.zeros(1), rejected=torch.zeros(1), ref_chosen=torch.zeros(1),
        ref_rejected=torch.zeros(1),
    )  # fmt: skip
    with pytest.raises(ValueError, match="chosen_lengths"):
        ipo_loss(no_lengths, beta=0.1)
    assert set(DPO_LOSSES) == {"sigmoid", "cdpo", "robust", "hinge", "ipo", "simpo", "orpo"}
    assert DPO_LOSSES["ipo"] is ipo_loss and DPO_LOSSES["simpo"] is simpo_loss
