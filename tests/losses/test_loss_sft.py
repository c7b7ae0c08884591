"""Token cross-entropy against hand-computed values, chunked and unchunked, fp32 and bf16."""

import math

import pytest
import torch

from posttrain.losses.sft import cross_entropy_loss

E = math.e
LOGITS = [[[1.0, 2.0, 3.0], [0.0, 0.0, 0.0], [3.0, 1.0, 0.0]]]  # (1, 3, 3)
LABELS = [[2, -100, 1]]  # aligned: position 1 is ignored
# position 0: CE = ln(e + e^2 + e^3) - 3, argmax 2 == label (hit)
# position 2: CE = ln(e^3 + e + 1) - 1, argmax 0 != 1 (miss)
CE0 = math.log(E + E**2 + E**3) - 3
CE2 = math.log(E**3 + E + 1) - 1
S0 = E + E**2 + E**3
# d CE / d logits = softmax - onehot(label); 0 for the ignored position
GRAD = [[[E / S0, E**2 / S0, E**3 / S0 - 1], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]]
S2 = E**3 + E + 1
GRAD[0][2] = [E**3 / S2, E / S2 - 1, 1 / S2]


@pytest.mark.parametrize("chunk_size", [None, 1, 2, 5])
def test_cross_entropy_sum_units_accuracy_and_grad(chunk_size):
    logits = torch.tensor(LOGITS, requires_grad=True)
    out = cross_entropy_loss(logits, torch.tensor(LABELS), chunk_size=chunk_size)
    assert math.isclose(out.total.item(), CE0 + CE2, rel_tol=1e-6)
    assert out.units.item() == 2.0
    assert out.metrics["token_accuracy"].item() == 0.5
    assert not out.metrics["token_accuracy"].requires_grad
    out.total.backward()
    torch.testing.assert_close(logits.grad, torch.tensor(GRAD))


@pytest.mark.parametrize("chunk_size", [None, 2])
def test_cross_entropy_bf16_logits_computed_in_float32(chunk_size):
    # the logits are exact in bf16; a bf16 log-softmax would miss by ~1e-2
    logits = torch.tensor(LOGITS, dtype=torch.bfloat16, requires_grad=True)
    out = cross_entropy_loss(logits, torch.tensor(LABELS), chunk_size=chunk_size)
    assert out.total.dtype == torch.float32
    assert math.isclose(out.total.item(), CE0 + CE2, rel_tol=1e-6)
    out.total.backward()
    assert logits.grad.dtype == torch.bfloat16
    torch.testing.assert_close(logits.grad.float(), torch.tensor(GRAD), atol=4e-3, rtol=0)


def test_cross_entropy_all_ignored_and_custom_ignore_index():
    logits = torch.tensor(LOGITS)
    out = cross_entropy_loss(logits, torch.full((1, 3), -100))
    assert (out.total.item(), out.units.item()) == (0.0, 0.0)
    assert out.metrics["token_accuracy"].item() == 0.0
    # a custom ignore_index: 0 marks the ignored position instead of -100
    out = cross_entropy_loss(logits, torch.tensor([[2, 0, 1]]), ignore_index=0)
    assert math.isclose(out.total.item(), CE0 + CE2, rel_tol=1e-6)
