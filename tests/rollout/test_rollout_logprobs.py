"""Teacher-forced `sequence_logprobs` against the log-probs recorded while sampling."""

from __future__ import annotations

import torch

from posttrain.models.forward_cost import shared_prompt_saves_work, token_and_pair_flops
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
    widths = batch.prompt_ids.shape[1], batch.completion_ids.shape[1]
    assert shared_prompt_saves_work(model, *widths, 4)  # so the shared layout is what is compared
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


def test_shared_prompt_layout_only_where_it_computes_less(model, capsys):
    """A [prompt | G completions] row attends over (P + G·C)² pairs: with long completions
    after a short prompt, G plain rows cost less, so sequence_logprobs runs those (same
    numbers)."""
    per_token, per_pair = token_and_pair_flops(model)
    # a wrapped model (DDP's `.module`, as the trainers pass it) is weighed as the model inside
    wrapper = torch.nn.Module()
    wrapper.module = model
    assert token_and_pair_flops(wrapper) == (per_token, per_pair)
    c = model.config
    assert per_pair == 4 * c.num_attention_heads * (c.hidden_size // c.num_attention_heads) * (
        c.num_hidden_layers
    )
    embed = model.get_input_embeddings().weight.numel()
    head = model.get_output_embeddings().weight
    matrices = sum(p.numel() for p in model.parameters() if p.dim() == 2)
    tied = head is model.get_input_embeddings().weight
    assert per_token == 2 * (matrices - embed - (0 if tied else head.numel()))
    assert shared_prompt_saves_work(model, 12, 8, 4)  # short answers: the prompt dominates
    assert not shared_prompt_saves_work(model, 12, 400, 4)  # long answers: attention dominates

    torch.manual_seed(0)
    vocab, n, P, C = model.config.vocab_size, 4, 12, 400
    prompt = torch.randint(3, vocab, (1, P)).repeat(n, 1)
    rows = (prompt, torch.ones(n, P, dtype=torch.long), torch.randint(3, vocab, (n, C)),
            torch.ones(n, C, dtype=torch.long))  # fmt: skip
    seen = []
    hook = model.get_input_embeddings().register_forward_pre_hook(
        lambda module, args: seen.append(tuple(args[0].shape))
    )
    try:
        with torch.no_grad():
            grouped = sequence_logprobs(model, *rows, group_size=n)
            plain = sequence_logprobs(model, *rows, group_size=1)
    finally:
        hook.remove()
    assert seen == [(n, P + C), (n, P + C)]  # the grouped call ran the plain layout
    torch.testing.assert_close(grouped, plain, atol=0, rtol=0)
    # one line says so, once per model, however many passes step aside
    assert capsys.readouterr().out.count("shared-prompt forward steps aside") == 1
