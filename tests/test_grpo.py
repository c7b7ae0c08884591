"""GRPO / DAPO / Dr. GRPO / Kimi on the shared rollout and scoring engines."""

import json
import textwrap

import pytest
import torch
from accelerate import Accelerator
from cli_helpers import REPO, run_cli

from posttrain.algorithms.grpo import GRPO, GRPORecipe
from posttrain.config import ConfigError, load_recipe


def rl_overrides(model_dir, data_dir, out, **extra):
    values = {
        "model.name_or_path": model_dir,
        "data.train_path": data_dir / "rl_train.jsonl",
        "data.eval_path": data_dir / "rl_test.jsonl",
        "data.max_eval_examples": 16,
        "train.output_dir": out,
        "train.max_steps": 2,
        "train.batch_size": 16,
        "train.eval_every": 0,
        "grpo.prompts_per_step": 4,
        "grpo.num_generations": 4,
        "grpo.max_new_tokens": 6,
        "logging.log_every": 1,
        "logging.progress": False,
        **extra,
    }
    return [f"{k}={v}" for k, v in values.items()]


def build(model_dir, data_dir, out, recipe="grpo_tiny.yaml", **extra):
    cfg = load_recipe(
        GRPORecipe, REPO / "recipes" / recipe, rl_overrides(model_dir, data_dir, out, **extra)
    )
    algo = GRPO(cfg)
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
    assert records[-1]["kl"] >= 0


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


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo", "kimi"])
def test_each_loss_type_trains_a_step(tiny_model_dir, arithmetic_dir, tmp_path, loss_type):
    extra = {"grpo.loss_type": loss_type}
    if loss_type == "dapo":
        extra.update({"grpo.dynamic_sampling": True, "grpo.epsilon_high": 0.28})
    if loss_type == "kimi":
        extra.update({"grpo.length_penalty_weight": 0.1, "grpo.prioritized_sampling": True})
    algo, acc, model = build(tiny_model_dir, arithmetic_dir, tmp_path, **extra)
    batches = algo.micro_batches(0, acc, model)
    assert sum(b.num_sequences for b in batches) <= 16
    out = algo.compute_loss(model, batches[0])
    assert torch.isfinite(out.total)
    out.total.backward()
    assert (
        any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
        or float(batches[0].advantages.abs().sum()) == 0
    )
    assert "zero_std_fraction" in algo.on_step_end(model, 1, acc)


def test_rollout_reused_for_num_iterations(tiny_model_dir, arithmetic_dir, tmp_path):
    algo, acc, model = build(tiny_model_dir, arithmetic_dir, tmp_path, **{"grpo.num_iterations": 2})
    first = algo.micro_batches(0, acc, model)
    again = algo.micro_batches(1, acc, model)
    assert first is again and first[0].old_logprobs is not None
    assert algo.micro_batches(2, acc, model) is not first
    assert algo.rollouts_done == 2


def test_kimi_needs_whole_groups_per_micro_batch(tiny_model_dir, arithmetic_dir, tmp_path):
    with pytest.raises(ConfigError, match="multiple of grpo.num_generations"):
        build(
            tiny_model_dir,
            arithmetic_dir,
            tmp_path,
            **{"grpo.loss_type": "kimi", "train.batch_size": 6},
        )


def test_same_seed_same_rollout(tiny_model_dir, arithmetic_dir, tmp_path):
    a, acc_a, model_a = build(tiny_model_dir, arithmetic_dir, tmp_path / "a")
    b, acc_b, model_b = build(tiny_model_dir, arithmetic_dir, tmp_path / "b")
    ba, bb = a.micro_batches(0, acc_a, model_a)[0], b.micro_batches(0, acc_b, model_b)[0]
    assert torch.equal(ba.completion_ids, bb.completion_ids)
    assert torch.equal(ba.advantages, bb.advantages)
