"""GRPO / DAPO / Dr. GRPO / Kimi on the shared rollout and scoring engines."""

import dataclasses
import json
import textwrap

import pytest
import torch
from accelerate import Accelerator
from cli_helpers import REPO, run_cli

from posttrain.algorithms.grpo import GRPO, GRPORecipe
from posttrain.algorithms.kimi import Kimi, KimiRecipe
from posttrain.config import ConfigError, load_recipe
from posttrain.losses.grpo import k3_kl
from posttrain.rollout import sequence_logprobs


def rl_overrides(model_dir, data_dir, out, section="grpo", **extra):
    values = {
        "model.name_or_path": model_dir,
        "data.train_path": data_dir / "rl_train.jsonl",
        "data.eval_path": data_dir / "rl_test.jsonl",
        "data.max_eval_examples": 16,
        "train.output_dir": out,
        "train.max_steps": 2,
        "train.batch_size": 16,
        "train.eval_every": 0,
        f"{section}.prompts_per_step": 4,
        f"{section}.num_generations": 4,
        f"{section}.max_new_tokens": 6,
        "logging.log_every": 1,
        "logging.progress": False,
        **extra,
    }
    return [f"{k}={v}" for k, v in values.items()]


def build(model_dir, data_dir, out, recipe="grpo_tiny.yaml", **extra):
    recipe_cls, algo_cls = (KimiRecipe, Kimi) if recipe.startswith("kimi") else (GRPORecipe, GRPO)
    section = "kimi" if recipe.startswith("kimi") else "grpo"
    cfg = load_recipe(
        recipe_cls,
        REPO / "recipes" / recipe,
        rl_overrides(model_dir, data_dir, out, section, **extra),
    )
    algo = algo_cls(cfg)
    accelerator = Accelerator(cpu=True)
    model = algo.setup(accelerator)
    return algo, accelerator, model


def test_grpo_cli_logs_rl_metrics(tiny_model_dir, arithmetic_dir, tmp_path):
    out = tmp_path / "grpo"
    r = run_cli(
        "grpo",
        "recipes/grpo_tiny.yaml",
        *rl_overrides(
            tiny_model_dir,
            arithmetic_dir,
            out,
            **{
                "grpo.rewards": "[{name: accuracy}, {name: digit_overlap, weight: 0.5}]",
                "grpo.beta": 0.04,
            },
        ),
    )
    assert r.returncode == 0, r.stderr
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    for key in (
        "rewards/mean",
        "rewards/std",
        "rewards/accuracy/mean",
        "rewards/digit_overlap/mean",
        "zero_std_fraction",
        "clip_fraction",
        "kl",
        "entropy",
        "completion_length",
        "truncation_rate",
        "rollout_seconds",
        "step_time",
        "accuracy",
        "eval/accuracy",
    ):
        assert key in records[-1], key


def test_user_reward_function_that_raises_is_survived_and_counted(
    tiny_model_dir, arithmetic_dir, tmp_path
):
    module = tmp_path / "my_rewards.py"
    module.write_text(
        textwrap.dedent("""
        def flaky(prompts, completions, **kwargs):
            if any(len(c) % 2 for c in completions):
                raise RuntimeError("boom")
            return [1.0 for _ in completions]

        def half_nan(prompts, completions, **kwargs):
            return [float("nan") if i % 2 else 0.5 for i in range(len(completions))]
    """)
    )
    out = tmp_path / "user"
    r = run_cli(
        "grpo",
        "recipes/grpo_tiny.yaml",
        *rl_overrides(
            tiny_model_dir,
            arithmetic_dir,
            out,
            **{
                "grpo.rewards": "[{name: 'my_rewards:flaky'}, {name: 'my_rewards:half_nan'}, {name: accuracy}]",
                "grpo.failure_reward": -1.0,
            },
        ),
        env={"PYTHONPATH": str(tmp_path)},
    )
    assert r.returncode == 0, r.stderr
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["scoring/failures"] > 0
    assert last["rewards/my_rewards:half_nan/failures"] == 8  # half of 16 samples
    assert (out / "final" / "model.safetensors").is_file()


LENGTH_REWARD = """
def length(prompts, completions, **columns):
    return [float(len(c)) for c in completions]
"""


def length_reward(tmp_path, monkeypatch) -> str:
    """A reward with spread inside every group (completion length in characters), so the
    advantages, the loss and the gradients cannot all be zero; the tiny model's accuracy is."""
    (tmp_path / "h13_length_reward.py").write_text(LENGTH_REWARD)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "[{name: 'h13_length_reward:length'}]"


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo", "kimi"])
def test_each_loss_type_trains_a_step(
    tiny_model_dir, arithmetic_dir, tmp_path, monkeypatch, loss_type
):
    rewards = length_reward(tmp_path, monkeypatch)
    extra = {"grpo.loss_type": loss_type, "grpo.rewards": rewards}
    if loss_type == "dapo":
        extra.update({"dapo.dynamic_sampling": True, "grpo.epsilon_high": 0.28})
    recipe = "grpo_tiny.yaml"
    if loss_type == "kimi":
        recipe, extra = "kimi_tiny.yaml", {"kimi.rewards": rewards, "kimi.length_penalty_weight": 0}
    algo, acc, model = build(tiny_model_dir, arithmetic_dir, tmp_path, recipe, **extra)
    batches = algo.micro_batches(0, acc, model)
    assert sum(b.num_sequences for b in batches) <= 16
    batch = batches[0]
    centred = batch.rewards.view(-1, 4) - batch.rewards.view(-1, 4).mean(1, keepdim=True)
    assert centred.abs().sum() > 0  # the reward really has spread
    if loss_type != "kimi":
        assert batch.advantages.abs().sum() > 0
    out = algo.compute_loss(model, batch)
    assert torch.isfinite(out.total)
    out.total.backward()
    grad_norm = sum(float(p.grad.norm()) for p in model.parameters() if p.grad is not None)
    assert grad_norm > 0
    # One small descent step must lower the same loss (π_old frozen at the pre-step policy):
    # a sign error or a dropped advantage/reward term would raise it or leave it unchanged.
    with torch.no_grad():
        before = sequence_logprobs(
            model,
            batch.prompt_ids,
            batch.prompt_mask,
            batch.completion_ids,
            batch.completion_mask,
            algo.settings.temperature,
        )
    frozen = dataclasses.replace(batch, old_logprobs=before)
    with torch.no_grad():
        loss_before = float(algo.compute_loss(model, frozen).total)
        params = {n: p.detach().clone() for n, p in model.named_parameters()}
        for p in model.parameters():
            if p.grad is not None:
                p -= 1e-2 * p.grad / grad_norm
        loss_after = float(algo.compute_loss(model, frozen).total)
    assert any(not torch.equal(p, params[n]) for n, p in model.named_parameters())
    assert loss_after < loss_before - 1e-6, (loss_before, loss_after)
    assert "zero_std_fraction" in algo.on_step_end(model, 1, acc)


def test_kl_is_measured_against_a_frozen_reference(
    tiny_model_dir, arithmetic_dir, tmp_path, monkeypatch
):
    """kl (k3) is 0 while the policy equals its reference and, once the policy has moved, equals
    the hand-computed k3 mean against the untouched starting weights."""
    algo, acc, model = build(
        tiny_model_dir,
        arithmetic_dir,
        tmp_path,
        **{"grpo.beta": 0.04, "grpo.rewards": length_reward(tmp_path, monkeypatch)},
    )
    batch = algo.micro_batches(0, acc, model)[0]
    assert batch.ref_logprobs is not None
    assert abs(float(algo.compute_loss(model, batch).metrics["kl"])) < 1e-6
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    batch = algo.micro_batches(1, acc, model)[0]  # a fresh rollout from the moved policy
    args = (batch.prompt_ids, batch.prompt_mask, batch.completion_ids, batch.completion_mask)
    reloaded = type(model).from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        kl = float(algo.compute_loss(model, batch).metrics["kl"])
        policy = sequence_logprobs(model, *args, algo.settings.temperature)
        reference = sequence_logprobs(reloaded, *args, algo.settings.temperature)
    mask = batch.completion_mask.bool()
    expected = float(k3_kl(policy, reference)[mask].mean())
    assert expected > 1e-3
    assert abs(kl - expected) < 1e-4 * max(1.0, expected)


def test_rollout_reused_for_num_iterations(tiny_model_dir, arithmetic_dir, tmp_path):
    algo, acc, model = build(tiny_model_dir, arithmetic_dir, tmp_path, **{"grpo.num_iterations": 2})
    first = algo.micro_batches(0, acc, model)
    again = algo.micro_batches(1, acc, model)
    assert first is again and first[0].old_logprobs is not None
    assert algo.micro_batches(2, acc, model) is not first
    assert algo.rollouts_done == 2


def test_kimi_needs_whole_groups_per_micro_batch(tiny_model_dir, arithmetic_dir, tmp_path):
    with pytest.raises(ConfigError, match="multiple of kimi.num_generations"):
        build(tiny_model_dir, arithmetic_dir, tmp_path, "kimi_tiny.yaml", **{"train.batch_size": 6})


def test_same_seed_same_rollout(tiny_model_dir, arithmetic_dir, tmp_path):
    a, acc_a, model_a = build(tiny_model_dir, arithmetic_dir, tmp_path / "a")
    b, acc_b, model_b = build(tiny_model_dir, arithmetic_dir, tmp_path / "b")
    ba, bb = a.micro_batches(0, acc_a, model_a)[0], b.micro_batches(0, acc_b, model_b)[0]
    assert torch.equal(ba.completion_ids, bb.completion_ids)
    assert torch.equal(ba.advantages, bb.advantages)
