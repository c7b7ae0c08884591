"""MTP label shifting, the MTP loss, and greedy / lossless speculative acceptance."""

import math

import pytest
import torch

from posttrain.losses.mtp import greedy_accept, mtp_labels, mtp_loss, speculative_accept

IGN = -100


def test_mtp_labels_shift():
    # tokens t0..t4 = 10..14, aligned labels[i] = token i+1 (last has no next token)
    labels = torch.tensor([[11, 12, 13, 14, IGN]])
    # head 0 at i predicts token i+2 = labels[i+1]; head 1 predicts token i+3 = labels[i+2]
    assert mtp_labels(labels, 0).tolist() == [[12, 13, 14, IGN, IGN]]
    assert mtp_labels(labels, 1).tolist() == [[13, 14, IGN, IGN, IGN]]
    assert mtp_labels(labels, 4).tolist() == [[IGN] * 5]


def test_mtp_labels_respect_packing_boundaries():
    # two packed examples a0 a1 a2 | b0 b1 b2 (ids 1..3 | 4..6); position ids restart at 0;
    # the pipeline already ignores the label that would cross the boundary
    labels = torch.tensor([[2, 3, IGN, 5, 6, IGN]])
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 2]])
    # a plain shift would let a2 (i = 2) predict b1 = 5 across the boundary
    assert mtp_labels(labels, 0).tolist() == [[3, IGN, 5, 6, IGN, IGN]]
    packed = mtp_labels(labels, 0, position_ids=position_ids)
    assert packed.tolist() == [[3, IGN, IGN, 6, IGN, IGN]]


def test_mtp_loss():
    labels = torch.tensor([[1, 2, 0]])  # head 0 targets (2, 0, ign); head 1 targets (0, ign, ign)
    head0 = torch.tensor([[[0.0, 0.0, math.log(2)], [math.log(3), 0.0, 0.0], [9.0, 0.0, 0.0]]])
    head1 = torch.tensor([[[0.0, math.log(4), 0.0], [9.0, 0.0, 0.0], [9.0, 0.0, 0.0]]])
    # head 0: p(2) = 2/4 -> ln 2 (hit); p(0) = 3/5 -> ln(5/3) (hit); CE_0 = mean
    # head 1: p(0) = 1/6 -> ln 6 (miss, argmax is 1)
    ce0 = (math.log(2) + math.log(5 / 3)) / 2
    ce1 = math.log(6)
    out = mtp_loss([head0, head1], labels, weight=0.3)
    assert out.total.item() == pytest.approx(0.3 / 2 * (ce0 + ce1))
    assert out.units.item() == 1.0
    m = {k: v.item() for k, v in out.metrics.items()}
    assert m["mtp_loss_0"] == pytest.approx(ce0) and m["mtp_loss_1"] == pytest.approx(ce1)
    assert m["mtp_acc_0"] == 1.0 and m["mtp_acc_1"] == 0.0


def test_greedy_accept():
    assert greedy_accept(torch.tensor([5, 7, 9]), torch.tensor([5, 7, 2, 4])) == (2, 2)
    assert greedy_accept(torch.tensor([5, 7]), torch.tensor([5, 7, 8])) == (2, 8)  # bonus
    assert greedy_accept(torch.tensor([1]), torch.tensor([2, 3])) == (0, 2)


def test_speculative_accept_deterministic_cases():
    gen = torch.Generator().manual_seed(0)
    q = torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.1, 0.2, 0.3, 0.4]])
    p = torch.cat([q, torch.tensor([[0.0, 0.0, 1.0, 0.0]])])  # p = q, bonus surely token 2
    for _ in range(20):  # p = q: every draft is accepted, the bonus comes from p[K]
        assert speculative_accept(torch.tensor([1, 3]), q, p, gen) == (2, 2)
    # p gives the drafted token 0 no mass: always rejected, resample from max(0, p - q) = e_3
    q0 = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    p0 = torch.tensor([[0.0, 0.0, 0.0, 1.0], [1.0, 0.0, 0.0, 0.0]])
    for _ in range(20):
        assert speculative_accept(torch.tensor([0]), q0, p0, gen) == (0, 3)


def test_speculative_accept_output_distribution_equals_target():
    # K = 2 drafts over a 4-token vocabulary; the emitted token at each position must follow p
    q = torch.tensor([[0.4, 0.3, 0.2, 0.1], [0.25, 0.25, 0.25, 0.25]])
    p = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.7, 0.1, 0.1, 0.1], [0.1, 0.1, 0.1, 0.7]])
    trials = 20_000
    gen = torch.Generator().manual_seed(1234)
    drafts = torch.stack([torch.multinomial(q[i], trials, True, generator=gen) for i in range(2)])
    counts = [[0] * 4 for _ in range(3)]  # emitted-token counts at positions 0, 1, 2
    accepted = [0, 0, 0]  # how many calls accepted 0, 1, 2 drafts
    for draft, draft_list in zip(drafts.T, drafts.T.tolist(), strict=True):
        n, next_token = speculative_accept(draft, q, p, gen)
        accepted[n] += 1
        for pos in range(n):
            counts[pos][draft_list[pos]] += 1
        counts[n][next_token] += 1
    counts = torch.tensor(counts, dtype=torch.float32)
    # P(accept draft 0) = Σ min(p0, q0) = .1 + .2 + .2 + .1 = .6
    assert abs((trials - accepted[0]) / trials - 0.6) < 0.02
    # then Σ min(p1, q1) = .25 + .1 + .1 + .1 = .55: P(both) = .6 * .55 = .33
    assert abs(accepted[2] / trials - 0.33) < 0.02
    for pos in range(3):
        seen = counts[pos].sum()
        freq = counts[pos] / seen
        assert (freq - p[pos]).abs().max() < 0.02 + 0.01 * (pos == 2), (pos, freq)
        # chi-square with 3 degrees of freedom: 16.27 is the 99.9% quantile
        chi2 = (((counts[pos] - seen * p[pos]) ** 2) / (seen * p[pos])).sum()
        assert chi2 < 16.27, (pos, chi2)
