"""Teacher-forced `sequence_logprobs` against the log-probs recorded while sampling."""

from __future__ import annotations

import torch

from posttrain.rollout import RolloutEngine, SamplingParams, sequence_logprobs


def sample(model, tokenizer, prompts, extra_eos, temperature=0.7, n=4):
    extra_eos(model, tokenizer, many=True)  # rows of mixed completion length
    engine = RolloutEngine(model, tokenizer)
    params = SamplingParams(n=n, temperature=temperature, max_new_tokens=16, seed=0)
    return engine.generate(prompts, params)


def test_teacher_forced_logprobs_match_sampling(model, tokenizer, prompts, extra_eos):
    batch = sample(model, tokenizer, prompts, extra_eos)
    assert batch.lengths.min() < batch.lengths.max()
    with torch.no_grad():
        recomputed = sequence_logprobs(
            model,
            batch.prompt_ids,
            batch.prompt_mask,
            batch.completion_ids,
            batch.completion_mask,
            0.7,
        )
    assert recomputed.dtype == torch.float32 and recomputed.shape == batch.logprobs.shape
    torch.testing.assert_close(recomputed, batch.logprobs, atol=1e-4, rtol=0)
    assert (recomputed[batch.completion_mask == 0] == 0).all()


def test_greedy_logprobs_are_scored_at_temperature_one(model, tokenizer, prompts, extra_eos):
    batch = sample(model, tokenizer, prompts, extra_eos, temperature=0.0, n=1)
    with torch.no_grad():
        recomputed = sequence_logprobs(
            model,
            batch.prompt_ids,
            batch.prompt_mask,
            batch.completion_ids,
            batch.completion_mask,
            0.0,
        )
    torch.testing.assert_close(recomputed, batch.logprobs, atol=1e-4, rtol=0)


def test_gradients_flow_and_entropy(model, tokenizer, prompts, extra_eos):
    batch = sample(model, tokenizer, prompts, extra_eos, n=2)
    model.train()
    logprobs, entropy = sequence_logprobs(
        model,
        batch.prompt_ids,
        batch.prompt_mask,
        batch.completion_ids,
        batch.completion_mask,
        temperature=0.7,
        return_entropy=True,
    )
    mask = batch.completion_mask.bool()
    vocab = model.config.vocab_size
    assert (entropy[mask] > 0).all() and (
        entropy[mask] <= torch.log(torch.tensor(vocab)) + 1e-4
    ).all()
    assert (entropy[~mask] == 0).all()
    # A policy-gradient-like loss on the rollout tensors (old logprobs included) backpropagates.
    ratio = (logprobs - batch.logprobs).exp()
    loss = -(ratio * mask).sum() / mask.sum()
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    without_entropy = sequence_logprobs(
        model, batch.prompt_ids, batch.prompt_mask, batch.completion_ids, batch.completion_mask, 0.7
    )
    torch.testing.assert_close(without_entropy, logprobs, atol=1e-5, rtol=0)


def score(model, batch, **kwargs):
    """sequence_logprobs of a rollout's own tokens at the sampling temperature."""
    rows = (batch.prompt_ids, batch.prompt_mask, batch.completion_ids, batch.completion_mask)
    return sequence_logprobs(model, *rows, 0.7, **kwargs)


def test_shared_prompt_forward_equals_one_row_per_sample(model, tokenizer, prompts, extra_eos):
    """group_size=n runs each prompt once for its n completions: same log-probs, entropies and
    gradients as one [prompt; completion] row per sample."""
    batch = sample(model, tokenizer, prompts, extra_eos, n=4)
    assert batch.lengths.min() < batch.lengths.max()
    model.train()
    results = []
    for group_size in (1, 4):
        model.zero_grad()
        logprobs, entropy = score(model, batch, return_entropy=True, group_size=group_size)
        weights = torch.linspace(-1, 1, logprobs.numel()).view_as(logprobs)
        (logprobs * weights).sum().backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters()])
        results.append((logprobs.detach(), entropy.detach(), grads))
    (lp1, ent1, g1), (lp4, ent4, g4) = results
    torch.testing.assert_close(lp4, lp1, atol=1e-4, rtol=0)
    torch.testing.assert_close(ent4, ent1, atol=1e-4, rtol=0)
    torch.testing.assert_close(g4, g1, atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(lp4, batch.logprobs, atol=1e-4, rtol=0)


def test_shared_prompt_forward_falls_back_when_prompts_differ(model, tokenizer, prompts, extra_eos):
    from posttrain.rollout.logprobs import shares_prompts

    batch = sample(model, tokenizer, prompts, extra_eos, n=2)
    assert shares_prompts(batch.prompt_ids, batch.prompt_mask, 2)
    assert not shares_prompts(batch.prompt_ids, batch.prompt_mask, 4)  # groups span prompts
    with torch.no_grad():
        torch.testing.assert_close(score(model, batch, group_size=4), score(model, batch))
