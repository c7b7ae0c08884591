"""Multi-turn rollouts through every online trainer (grpo with each loss family, kimi, ppo), the
README's user environment, and PPO's GAE over a mask with holes."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator
from cli_helpers import REPO, run_cli

from posttrain.algorithms.ppo_rollout import estimate_advantages
from posttrain.data.tools import format_tool_call


@pytest.fixture(scope="module")
def chatty_model(tiny_model_dir, tmp_path_factory):
    """The tiny model with many ids as EOS in its generation config, so a random model's turns
    end and conversations continue (eos_ids reads the generation config)."""
    out = tmp_path_factory.mktemp("chatty") / "model"
    shutil.copytree(tiny_model_dir, out)
    config = json.loads((out / "generation_config.json").read_text())
    config["eos_token_id"] = list(range(2, 450, 5))
    (out / "generation_config.json").write_text(json.dumps(config))
    return out


CASES = {
    "grpo-cispo": ("grpo", "grpo_tiny.yaml", {"grpo.loss_type": "cispo"}),
    "grpo-gspo-2-iterations": (
        "grpo",
        "grpo_tiny.yaml",
        {"grpo.loss_type": "gspo", "grpo.num_iterations": 2, "grpo.beta": 0.04},
    ),
    "kimi": ("kimi", "kimi_tiny.yaml", {}),
    "ppo": ("ppo", "ppo_tiny.yaml", {"ppo.init_kl_coef": 0.05}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_trainers_learn_from_multi_turn_rollouts(chatty_model, arithmetic_dir, tmp_path, case):
    algorithm, recipe, extra = CASES[case]
    section = algorithm
    sizes = (
        {"ppo.prompts_per_rollout": 4, "ppo.samples_per_prompt": 2}
        if algorithm == "ppo"
        else {f"{section}.prompts_per_step": 4, f"{section}.num_generations": 2}
    )
    overrides = {
        "model.name_or_path": chatty_model,
        "data.train_path": arithmetic_dir / "rl_train.jsonl",
        "data.eval_path": arithmetic_dir / "rl_test.jsonl",
        "data.max_eval_examples": 4,
        "data.max_length": 128,
        "train.output_dir": tmp_path / "out",
        "train.max_steps": 2,
        "train.batch_size": 8,
        "train.eval_every": 2,
        "logging.log_every": 1,
        "logging.progress": False,
        f"{section}.environment": "tests.multiturn_envs:ChattyEnv",
        f"{section}.max_turns": 3,
        f"{section}.max_new_tokens": 8,
        f"{section}.rewards": "[]",
        **sizes,
        **extra,
    }
    result = run_cli(algorithm, f"recipes/{recipe}", *[f"{k}={v}" for k, v in overrides.items()])
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in records if "env/turns" in r][-1]
    assert last["env/turns"] > 1  # conversations did continue after the environment spoke
    assert last["env/sampled_tokens"] < last["completion_length"]  # environment tokens present
    assert last["env/errors"] == 0 and last["env/timeouts"] == 0
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records if "loss" in r)
    assert "eval/accuracy" in records[-1]


def test_environment_keys_need_an_environment(tiny_model_dir, arithmetic_dir, tmp_path):
    result = run_cli(
        "grpo",
        "recipes/grpo_tiny.yaml",
        f"model.name_or_path={tiny_model_dir}",
        f"data.train_path={arithmetic_dir / 'rl_train.jsonl'}",
        f"data.eval_path={arithmetic_dir / 'rl_test.jsonl'}",
        f"train.output_dir={tmp_path / 'out'}",
        "grpo.max_turns=2",
    )
    assert result.returncode == 2
    assert "grpo.max_turns is used only with grpo.environment" in result.stderr


def test_readme_user_environment_and_tool(tiny_model_dir):
    """The README's example (examples/letter_env.py) as a recipe names it."""
    import sys

    from transformers import AutoTokenizer

    from posttrain.envs import EnvRunner

    sys.path.insert(0, str(REPO))
    try:
        tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
        runner = EnvRunner(
            "examples.letter_env:LetterCountEnv",
            tokenizer,
            tools=["examples.letter_env:word_length"],
        )
        row = {"prompt": "How many letters has 'posttrain'?", "answer": "9"}
        session = runner.session(row, "row 1")
        assert "tools: word_length" in tokenizer.decode(session.prompt_ids)
        eos = [tokenizer.eos_token_id]
        call = format_tool_call("word_length", {"word": "posttrain"})
        reply = session.step(tokenizer(call, add_special_tokens=False)["input_ids"] + eos, True)
        assert tokenizer.decode(reply) == "<|tool|>9<|end|><|assistant|>"
        assert (
            session.step(tokenizer("9", add_special_tokens=False)["input_ids"] + eos, True) is None
        )
        assert session.reward == 1.0
    finally:
        sys.path.remove(str(REPO))


def test_ppo_gae_runs_over_the_sampled_tokens_only():
    """A mask with holes (environment tokens) gives, on the sampled tokens, what the same
    tokens give packed together; 0 on the holes."""
    torch.manual_seed(0)
    holed = torch.tensor([[1, 1, 0, 0, 1, 1, 0], [1, 0, 1, 1, 1, 0, 0]])
    packed = torch.tensor([[1, 1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0, 0]])
    old, ref, values = (torch.randn(2, 7) for _ in range(3))
    scores = torch.tensor([1.0, -0.5])
    ppo = SimpleNamespace(gamma=0.9, lam=0.8, kl_estimator="k1", whiten_advantages=False)
    accelerator = Accelerator(cpu=True)

    def pack(x):
        return torch.stack([torch.cat([r[m.bool()], r[~m.bool()]]) for r, m in zip(x, holed)])

    adv_h, ret_h, metrics_h = estimate_advantages(
        scores, old, ref, values, holed, 0.1, ppo, accelerator
    )
    adv_p, ret_p, metrics_p = estimate_advantages(
        scores, pack(old), pack(ref), pack(values), packed, 0.1, ppo, accelerator
    )
    for h, p in ((adv_h, adv_p), (ret_h, ret_p)):
        torch.testing.assert_close(pack(h)[packed.bool()], p[packed.bool()])
        assert (h[~holed.bool()] == 0).all()
    assert metrics_h == pytest.approx(metrics_p)


@pytest.mark.slow
def test_demo_tools_stage_gains_15_points(tmp_path):
    """The demo's `tools` stage: weak tool-use SFT, then GRPO in the calculator environment."""
    result = run_cli("demo", "--out", str(tmp_path), "--stages", "tools", timeout=3600)
    assert result.returncode == 0, result.stderr[-2000:]
    (record,) = json.loads((tmp_path / "demo_summary.json").read_text())
    assert record["stage"] == "tools"
    assert record["accuracy_after"] - record["accuracy_before"] >= 0.15, record
    assert record["train_seconds"] <= 600, record
