"""Each trainer learns: a short seeded run on the tiny task from the random tiny model raises
its objective by a stated margin over the step-0 baseline.

- rm, dpo: pairwise accuracy on 64 fixed training pairs (the trainer must fit what it is shown;
  held-out accuracy on near-miss additions needs the long recipes of the demo). rm's baseline is
  the untrained head's accuracy; dpo's implicit rewards are all 0 at step 0 (policy =
  reference), so its baseline accuracy is 0.
- grpo, kimi, ppo: the mean reward of the rollouts. The reward is the number of digits in the
  completion (capped at 4, over 4): dense, so a random model has spread in every group, and the
  first step toward answering an addition. The baseline is the first rollout (sampled by the
  initial policy), compared with the mean of the last three.
"""

from __future__ import annotations

import json

import pytest
from accelerate import Accelerator
from cli_helpers import REPO

from posttrain.algorithms import ALGORITHMS
from posttrain.config import load_recipe
from posttrain.train.loop import train

DIGITS_REWARD = """
def digits(prompts, completions, **columns):
    return [min(sum(ch.isdigit() for ch in c), 4) / 4 for c in completions]
"""


def records(out) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def recipe_for(name, tiny_model_dir, data_dir, out, extra):
    recipe_cls, algorithm_cls = ALGORITHMS[name]
    recipe = {"kimi": "kimi_tiny.yaml"}.get(name, f"{name}_tiny.yaml")
    values = {
        "model.name_or_path": tiny_model_dir,
        "train.output_dir": out,
        "train.seed": 0,
        "train.save_every": 0,
        "train.eval_every": 0,
        "logging.log_every": 1,
        "logging.progress": False,
        **extra,
    }
    overrides = [f"{k}={v}" for k, v in values.items()]
    return recipe_cls, algorithm_cls, load_recipe(recipe_cls, REPO / "recipes" / recipe, overrides)


def pairs_file(arithmetic_dir, tmp_path):
    """The first 64 training pairs, used as the measured set."""
    rows = (arithmetic_dir / "preference_train.jsonl").read_text().splitlines()[:64]
    path = tmp_path / "measured_pairs.jsonl"
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.mark.slow  # ~30 s each on 2 CPU cores
@pytest.mark.parametrize(
    ("name", "metric", "margin", "steps"),
    [("dpo", "rewards_accuracy", 0.5, 12), ("rm", "accuracy", 0.15, 30)],
)
def test_preference_trainer_learns(
    name, metric, margin, steps, tiny_model_dir, arithmetic_dir, tmp_path
):
    measured = pairs_file(arithmetic_dir, tmp_path)
    extra = {
        "data.train_path": measured,
        "data.eval_path": measured,
        "data.max_eval_examples": 64,
        "train.max_steps": steps,
        "train.batch_size": 32,
        "optim.lr": 1e-3,
        "optim.warmup_steps": 0,
        "optim.scheduler": "constant",
    }
    _, algorithm_cls, cfg = recipe_for(name, tiny_model_dir, arithmetic_dir, tmp_path / name, extra)
    baseline_algo = algorithm_cls(cfg)
    accelerator = Accelerator(cpu=True)
    model = baseline_algo.setup(accelerator)
    baseline = baseline_algo.evaluate(model, accelerator)[metric]
    train(cfg, algorithm_cls(cfg))
    after = records(tmp_path / name)[-1][f"eval/{metric}"]
    assert after >= baseline + margin, (baseline, after)


@pytest.mark.parametrize(
    "name",
    [
        "grpo",
        pytest.param("kimi", marks=pytest.mark.slow),
        pytest.param("ppo", marks=pytest.mark.slow),
    ],
)
def test_online_trainer_learns(name, tiny_model_dir, arithmetic_dir, tmp_path, monkeypatch):
    (tmp_path / "h13_digits_reward.py").write_text(DIGITS_REWARD)
    monkeypatch.syspath_prepend(str(tmp_path))
    section = "ppo" if name == "ppo" else name
    extra = {
        "data.train_path": arithmetic_dir / "rl_train.jsonl",
        "data.eval_path": "",
        "train.max_steps": 20,
        "train.batch_size": 32,
        "optim.lr": 3e-3,
        "optim.warmup_steps": 0,
        "optim.scheduler": "constant",
        f"{section}.max_new_tokens": 6,
        f"{section}.temperature": 1.0,
        f"{section}.rewards": "[{name: 'h13_digits_reward:digits'}]",
    }
    if name == "ppo":
        extra.update({"ppo.prompts_per_rollout": 32, "ppo.ppo_epochs": 1})
    else:
        extra.update({f"{section}.prompts_per_step": 8, f"{section}.num_generations": 4})
    if name == "kimi":
        extra.update({"kimi.length_penalty_weight": 0.0, "kimi.tau": 0.1})
    _, algorithm_cls, cfg = recipe_for(name, tiny_model_dir, arithmetic_dir, tmp_path / name, extra)
    train(cfg, algorithm_cls(cfg))
    rewards = [r["rewards/mean"] for r in records(tmp_path / name)]
    baseline, after = rewards[0], sum(rewards[-3:]) / 3
    assert after >= baseline + 0.2, rewards
