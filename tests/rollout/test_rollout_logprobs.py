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
