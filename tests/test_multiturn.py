"""Multi-turn rollouts (rollout/multiturn.py): continuing a conversation by appending the
environment's tokens to the KV cache gives the same tokens and log-probs as re-prefilling the
whole conversation, and as teacher forcing; environment tokens carry no gradient."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from posttrain.algorithms.grpo import GRPO, GRPORecipe
from posttrain.algorithms.rl_common import to_policy_batches
from posttrain.losses.policy import POLICY_LOSSES
from posttrain.rollout import RolloutEngine, SamplingParams, sequence_logprobs
from posttrain.rollout.multiturn import MultiTurnDriver


class ScriptedSession:
    """Token-level session: replies of different lengths per row, then the episode ends."""

    def __init__(self, prompt_ids: list[int], row: int, replies: int = 2):
        self.prompt_ids, self.row, self.left = prompt_ids, row, replies
        self.steps: list[list[int]] = []

    def step(self, turn_ids: list[int], eos: bool) -> list[int] | None:
        self.steps.append(turn_ids)
        if self.left == 0:
            return None
        self.left -= 1
        return [7, 8, 9, 10][: 1 + (self.row + self.left) % 4]


@pytest.fixture(scope="module")
def policy(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    return model, tokenizer


def rollout(policy, params, reuse_cache, n_prompts=3):
    model, tokenizer = policy
    # A random model rarely samples <|end|>: here many ids end a turn (eos_ids reads the
    # generation config), so turns are short and conversations do continue. Greedy decoding of
    # a random model repeats one token, so there every id ends a turn (one-token turns).
    step = 1 if params.temperature == 0 else 6
    model.generation_config.eos_token_id = list(range(0, len(tokenizer), step))
    texts = ["What is 12 * 34?", "Compute 5 + 6.", "Hi"][:n_prompts]
    prompts = [tokenizer(t)["input_ids"] for t in texts]
    sessions = [
        ScriptedSession(p, i * params.n + k) for i, p in enumerate(prompts) for k in range(params.n)
    ]
    driver = MultiTurnDriver(
        RolloutEngine(model, tokenizer), params, max_turns=3, reuse_cache=reuse_cache
    )
    return driver.generate(sessions, prompt_seeds=[11, 12, 13][:n_prompts]), sessions


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_kv_continuation_equals_reprefill_and_teacher_forcing(policy, temperature):
    params = SamplingParams(n=2, temperature=temperature, max_new_tokens=6, seed=3)
    fast, sessions = rollout(policy, params, reuse_cache=True)
    plain, _ = rollout(policy, params, reuse_cache=False)
    assert int(fast.env_mask.sum()) > 0, "no conversation continued: the test would be vacuous"
    assert max(len(s.steps) for s in sessions) >= 2
    assert torch.equal(fast.completion_ids, plain.completion_ids)
    assert torch.equal(fast.env_mask, plain.env_mask)
    assert torch.equal(fast.completion_mask, plain.completion_mask)
    torch.testing.assert_close(fast.logprobs, plain.logprobs, atol=1e-5, rtol=0)
    # Teacher forcing over [prompt; whole conversation] gives the sampled tokens' log-probs.
    model, _ = policy
    with torch.no_grad():
        forced = sequence_logprobs(
            model,
            fast.prompt_ids,
            fast.prompt_mask,
            fast.completion_ids,
            fast.completion_mask,
            temperature,
        )
    sampled = fast.sampled_mask.bool()
    torch.testing.assert_close(forced[sampled], fast.logprobs[sampled], atol=1e-4, rtol=0)
    assert (fast.logprobs[fast.env_mask.bool()] == 0).all()


def test_env_tokens_are_the_scripted_replies(policy):
    params = SamplingParams(n=1, temperature=1.0, max_new_tokens=6, seed=5)
    batch, sessions = rollout(policy, params, reuse_cache=True)
    for r, session in enumerate(sessions):
        ids, env = batch.completion_ids[r].tolist(), batch.env_mask[r].tolist()
        sampled = [t for t, e, m in zip(ids, env, batch.completion_mask[r].tolist()) if m and not e]
        assert sampled == [t for turn in session.steps for t in turn]


@pytest.mark.parametrize("loss_type", sorted(POLICY_LOSSES))
def test_gradient_is_zero_on_environment_tokens(policy, loss_type):
    model, tokenizer = policy
    params = SamplingParams(n=2, temperature=1.0, max_new_tokens=6, seed=3)
    batch, _ = rollout(policy, params, reuse_cache=True)
    cfg = GRPORecipe()
    cfg.grpo.loss_type = loss_type
    cfg.grpo.num_generations = 2
    grpo = GRPO(cfg)
    grpo.group_size = 1
    mask = batch.sampled_mask
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5, 2.0, -2.0])
    old = batch.logprobs - 0.01 * mask  # a ratio away from 1, so clipping losses see a gradient
    (policy_batch,) = to_policy_batches(
        batch, advantages, advantages, mask, old, None, 64, rollout_logprobs=batch.logprobs
    )
    captured = {}

    def keep_logits(module, args, out):
        out.retain_grad()
        captured["logits"] = out

    hook = model.lm_head.register_forward_hook(keep_logits)
    try:
        out = grpo.compute_loss(model, policy_batch)
        out.total.backward()
    finally:
        hook.remove()
        model.zero_grad()
    width = batch.completion_ids.shape[1]
    grad = captured["logits"].grad[:, -(width + 1) : -1]  # (N, C, V): position t predicts token t
    per_token = grad.abs().sum(-1)  # (N, C)
    env = batch.env_mask.bool()
    assert (per_token[env] == 0).all()
    assert (per_token[mask.bool()] > 0).any()
