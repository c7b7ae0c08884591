"""The token filters and the inverse-CDF sampler against hand-computed cases."""

from __future__ import annotations

import math

import torch

from posttrain.rollout.sampling import draw_uniforms, filter_logits, sample_next
from posttrain.rollout.types import SamplingParams


def test_top_k_keeps_k_largest():
    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0]])
    kept = filter_logits(logits, top_k=2, top_p=1.0)
    assert torch.isinf(kept).tolist() == [[True, False, False, True]]


def test_top_p_keeps_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    # 0.5 < 0.7, 0.5 + 0.3 >= 0.7: the two most likely tokens stay.
    assert torch.isinf(filter_logits(logits, 0, 0.7)).tolist() == [[False, False, True, True]]
    # Exactly reaching p stops there too; and the top token always stays.
    assert torch.isinf(filter_logits(logits, 0, 0.5)).tolist() == [[False, True, True, True]]
    assert torch.isinf(filter_logits(logits, 0, 0.01)).tolist() == [[False, True, True, True]]


def test_inverse_cdf_picks_by_uniform_and_never_a_filtered_token():
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4])
    logits = probs.log().expand(5, 4)
    uniforms = torch.tensor([0.05, 0.15, 0.45, 0.95, 1.0 - 1e-9])
    tokens, _ = sample_next(logits, SamplingParams(), uniforms)
    assert tokens.tolist() == [0, 1, 2, 3, 3]
    # With top_k=2 only tokens 2 and 3 can come out, even for uniforms at the edges.
    tokens, _ = sample_next(
        logits, SamplingParams(top_k=2), torch.tensor([0.0, 0.4, 0.5, 1 - 1e-9, 0.99])
    )
    assert tokens.tolist() == [2, 2, 3, 3, 3]


def test_logprob_is_of_the_unfiltered_tempered_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    token, logprob = sample_next(
        logits, SamplingParams(temperature=2.0, top_k=1), torch.tensor([0.7])
    )
    expected = 1.0 - math.log(math.exp(1.0) + math.exp(0.5) + 1.0)
    assert token.item() == 0 and abs(logprob.item() - expected) < 1e-6


def test_sampling_frequencies_follow_the_distribution():
    probs = torch.tensor([0.6, 0.3, 0.1])
    uniforms = draw_uniforms(20000, 1, 1, seed=0, prompt_seeds=None, device=torch.device("cpu"))
    logits = probs.log().expand(20000, 3)
    tokens, _ = sample_next(logits, SamplingParams(), uniforms[:, 0])
    freq = torch.bincount(tokens, minlength=3).float() / len(tokens)
    torch.testing.assert_close(freq, probs, atol=0.015, rtol=0)


def test_prompt_seeds_tie_random_numbers_to_the_prompt():
    cpu = torch.device("cpu")
    both = draw_uniforms(2, 3, 5, seed=None, prompt_seeds=[7, 8], device=cpu)
    alone = draw_uniforms(1, 3, 5, seed=123, prompt_seeds=[8], device=cpu)
    assert both.shape == (6, 5) and torch.equal(both[3:], alone)
    assert torch.equal(draw_uniforms(2, 3, 5, 1, None, cpu), draw_uniforms(2, 3, 5, 1, None, cpu))
