"""Masked reductions and log-softmax helpers against hand-computed numbers."""

import math

import torch

from posttrain.losses.common import (
    entropy_from_logits,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    selective_log_softmax,
)

NAN, INF = float("nan"), float("inf")


def test_masked_sum_and_mean_ignore_padding_even_nan_and_inf():
    x = torch.tensor([[1.0, 2.0, NAN], [4.0, INF, 6.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 1]])
    # kept: 1, 2, 4, 6 -> sum 13, mean 13 / 4 = 3.25
    assert masked_sum(x, mask).item() == 13.0
    assert masked_mean(x, mask).item() == 3.25
    # rows: 1 + 2 = 3 and 4 + 6 = 10; means 3 / 2 = 1.5 and 10 / 2 = 5
    assert masked_sum(x, mask, dim=1).tolist() == [3.0, 10.0]
    assert masked_mean(x, mask, dim=1).tolist() == [1.5, 5.0]


def test_masked_mean_of_empty_mask_is_zero_not_nan():
    x = torch.tensor([[3.0, 4.0], [5.0, 7.0]])
    mask = torch.tensor([[False, False], [True, False]])
    assert masked_mean(x, torch.zeros(2, 2, dtype=torch.bool)).item() == 0.0
    # row 0 empty -> 0; row 1 keeps only 5
    assert masked_mean(x, mask, dim=1).tolist() == [0.0, 5.0]


def test_masked_var_biased_and_unbiased():
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, 6.0, -100.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    # kept 1, 2, 3, 6: mean 3; squared deviations 4 + 1 + 0 + 9 = 14
    assert math.isclose(masked_var(x, mask, unbiased=False).item(), 14 / 4, rel_tol=1e-6)
    assert math.isclose(masked_var(x, mask).item(), 14 / 3, rel_tol=1e-6)
    # one element: no spread, and no nan from n / (n - 1)
    one = torch.tensor([[True, False, False], [False, False, False]])
    assert masked_var(x, one).item() == 0.0


def test_masked_whiten():
    x = torch.tensor([1.0, 2.0, 3.0, 6.0, 50.0])
    mask = torch.tensor([1, 1, 1, 1, 0])
    std = math.sqrt(14 / 3)  # unbiased, from the test above
    expected = [(v - 3) / std for v in (1, 2, 3, 6)] + [0.0]  # padding is zeroed
    torch.testing.assert_close(masked_whiten(x, mask), torch.tensor(expected))
    shifted = [e + 3 for e in expected[:4]] + [0.0]  # shift_mean=False adds the mean back
    torch.testing.assert_close(masked_whiten(x, mask, shift_mean=False), torch.tensor(shifted))


def test_selective_log_softmax_float32():
    logits = torch.tensor([[[0.0, math.log(3)], [0.0, 0.0]], [[2.0, 0.0], [1.0, 1.0]]])
    index = torch.tensor([[1, 0], [0, 1]])
    expected = [
        [math.log(3 / 4), math.log(1 / 2)],  # softmax(0, ln3) = (1/4, 3/4); uniform over 2
        [2 - math.log(math.exp(2) + 1), math.log(1 / 2)],
    ]
    out = selective_log_softmax(logits, index)
    assert out.shape == (2, 2)
    torch.testing.assert_close(out, torch.tensor(expected))


def test_selective_log_softmax_bf16_is_computed_in_float32():
    # 0, 1, 2, 3 are exact in bf16; logsumexp = ln(1 + e + e^2 + e^3) ~ 3.4401897
    logits = torch.tensor([[[0.0, 1.0, 2.0, 3.0], [0.0, 1.0, 2.0, 3.0]]], dtype=torch.bfloat16)
    lse = math.log(1 + math.e + math.e**2 + math.e**3)
    out = selective_log_softmax(logits, torch.tensor([[3, 0]]))
    assert out.dtype == torch.float32
    # a bf16 computation would be off by ~1e-2; float32 is within 1e-6
    torch.testing.assert_close(out, torch.tensor([[3 - lse, -lse]]), atol=1e-6, rtol=0)


def test_entropy_from_logits_in_chunks():
    logits = torch.tensor([[[0.0, math.log(3)]], [[5.0, 5.0]]])  # (2, 1, 2)
    # p = (1/4, 3/4): H = -(1/4 ln 1/4 + 3/4 ln 3/4); uniform over 2: ln 2
    h0 = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    for chunk_size in (1, 128):
        out = entropy_from_logits(logits, chunk_size=chunk_size)
        assert out.shape == (2, 1)
        torch.testing.assert_close(out, torch.tensor([[h0], [math.log(2)]]))
    bf16 = entropy_from_logits(torch.tensor([[0.0, 0.0, 0.0, 0.0]], dtype=torch.bfloat16))
    assert bf16.dtype == torch.float32
    torch.testing.assert_close(bf16, torch.tensor([math.log(4)]))
