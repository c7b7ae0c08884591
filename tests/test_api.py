"""The Python API (posttrain/api.py): the README example runs as written; an in-memory data set
and model objects train exactly like the files and paths they stand for; callbacks fire; reward
callables bind to the recipe by name; `import posttrain` stays light."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import pytest
import torch
from cli_helpers import REPO

from posttrain import GRPOTrainer, SFTTrainer, load_recipe
from posttrain.config import ConfigError

README = REPO / "README.md"


def readme_example() -> str:
    """The first ```python block of the README's "Python API" section, verbatim."""
    text = README.read_text()
    section = text[text.index("\n## Python API\n") :]
    section = section[: section.index("\n## ", 1)]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_example_runs(tiny_model_dir, tmp_path, monkeypatch, capsys):
    (tmp_path / "runs").mkdir()
    shutil.copytree(tiny_model_dir, tmp_path / "runs" / "tiny-init")
    monkeypatch.chdir(tmp_path)
    exec(compile(readme_example(), str(README), "exec"), {"__name__": "readme"})
    printed = capsys.readouterr().out
    assert "step 2: loss" in printed and "step 4: loss" in printed  # the on_log callback
    for run in ("api-sft", "api-grpo"):
        assert (tmp_path / "runs" / run / "final" / "config.json").is_file()
    config = (tmp_path / "runs" / "api-sft" / "config.yaml").read_text()
    assert "runs/api-sft/api_data/train-" in config  # the saved data set, named in the record
    grpo_metrics = (tmp_path / "runs" / "api-grpo" / "metrics.jsonl").read_text()
    assert "rewards/exact/mean" in grpo_metrics  # the user's function scored the samples


def _rows(n: int = 24) -> list[dict]:
    return [{"prompt": f"{i}+{i % 7}=", "completion": f"{i + i % 7}"} for i in range(n)]


def _losses(run_dir) -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines if '"loss"' in line]


SFT_OVERRIDES = [
    "train.max_steps=3",
    "train.batch_size=4",
    "data.max_length=24",
    "logging.log_every=1",
    "logging.progress=false",
    "train.eval_every=2",
    "optim.lr=1e-3",
]


def test_objects_train_like_the_paths_they_stand_for(tiny_model_dir, tmp_path):
    """Files + model.name_or_path (the CLI's way) and Dataset + model/tokenizer objects give the
    same losses and the same trained weights; the object is trained in place; every callback
    fires at the steps the loop promises."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rows = _rows()
    train_file, eval_file = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    train_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    eval_file.write_text("".join(json.dumps(r) + "\n" for r in rows[:8]))
    by_path = SFTTrainer(
        {"model": {"name_or_path": str(tiny_model_dir)}},
        overrides=[
            *SFT_OVERRIDES,
            f"data.train_path={train_file}",
            f"data.eval_path={eval_file}",
            f"train.output_dir={tmp_path / 'by_path'}",
        ],
    ).train()

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    events = []

    class Recorder:
        def on_step_end(self, step, state):
            events.append(("step_end", step, state.step))

        def on_evaluate(self, step, metrics):
            events.append(("evaluate", step, sorted(metrics)))

    by_object = SFTTrainer(
        load_recipe("sft", overrides=[*SFT_OVERRIDES, f"train.output_dir={tmp_path / 'obj'}"]),
        train_dataset=Dataset.from_list(rows),
        eval_dataset=rows[:8],  # a list of dicts is accepted too
        model=model,
        tokenizer=AutoTokenizer.from_pretrained(tiny_model_dir),
        callbacks=[Recorder()],
        on_log=lambda step, metrics: events.append(("log", step, round(metrics["loss"], 6))),
    )
    result = by_object.train()

    assert _losses(tmp_path / "obj") == pytest.approx(_losses(tmp_path / "by_path"), rel=1e-6)
    assert result.last_metrics["loss"] == pytest.approx(by_path.last_metrics["loss"], rel=1e-6)
    # in place: the caller's object holds the trained weights, equal to the path run's final/
    trained = AutoModelForCausalLM.from_pretrained(by_path.final_dir).state_dict()
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert changed, "the model object was not trained"
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, trained[key], rtol=1e-5, atol=1e-6)
    kinds = [e for e in events if e[0] == "step_end"]
    assert kinds == [("step_end", s, s) for s in (1, 2, 3)]
    assert [e[1] for e in events if e[0] == "log"] == [1, 2, 3]
    evaluations = [e for e in events if e[0] == "evaluate"]
    assert [e[1] for e in evaluations] == [2, 3] and "loss" in evaluations[0][2]


def test_grpo_reward_callable_and_model_object(tiny_model_dir, tmp_path):
    """A TRL-style reward (keywords only, a data column) scores the samples; the provided model
    trains in place, with a reference copied from the object (beta > 0), not reloaded."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    calls = []

    def longer(completions, answer, **kwargs):  # varied rewards: the group has an advantage
        calls.append(len(completions))
        assert len(answer) == len(completions)
        return [float(len(c)) for c in completions]

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    with torch.no_grad():  # the object now differs from the checkpoint its name_or_path names
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    from transformers import AutoTokenizer

    before = [p.detach().clone() for p in model.parameters()]
    recipe = load_recipe(
        "grpo",
        {"grpo": {"num_generations": 4, "prompts_per_step": 2, "max_new_tokens": 6, "beta": 0.1}},
        [
            f"train.output_dir={tmp_path}",
            "train.max_steps=2",
            "data.max_length=24",
            "logging.progress=false",
            "optim.lr=1e-3",
            "logging.log_every=1",
        ],
    )
    result = GRPOTrainer(
        recipe,
        model=model,
        tokenizer=AutoTokenizer.from_pretrained(tiny_model_dir),
        train_dataset=Dataset.from_list(
            [{"prompt": f"{i}+1=", "answer": str(i + 1)} for i in range(8)]
        ),
        reward_funcs={"length": longer},
    ).train()
    assert calls, "the reward function was never called"
    assert "rewards/length/mean" in result.last_metrics
    # The reference is the object as handed in (not the checkpoint on disk): at the first step,
    # before any update, policy and reference agree, so the KL estimate is exactly 0.
    first = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 1 and first["kl"] == pytest.approx(0.0, abs=1e-6)
    assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert (result.final_dir / "model.safetensors").is_file()


def test_reward_functions_bind_by_name():
    from posttrain.api import _apply_rewards

    def accuracy(completions, **kw):
        return [0.0] * len(completions)

    def style(completions, **kw):
        return [0.0] * len(completions)

    cfg = load_recipe(
        "grpo", {"grpo": {"rewards": [{"name": "accuracy", "weight": 0.5}, {"name": "format"}]}}
    )
    _apply_rewards(cfg, {"accuracy": accuracy})  # named in the recipe: keeps its weight
    assert [(r.name, r.weight) for r in cfg.grpo.rewards] == [("accuracy", 0.5), ("format", 1.0)]
    _apply_rewards(cfg, {"style": style, "other": style})  # named nowhere: they replace the list
    assert [(r.name, r.weight) for r in cfg.grpo.rewards] == [("style", 1.0), ("other", 1.0)]
    with pytest.raises(ConfigError, match=r"\['accuracy'\] are not among"):
        _apply_rewards(cfg, {"style": style, "accuracy": accuracy})
    with pytest.raises(ConfigError, match="lambda"):
        GRPOTrainer(reward_funcs=[lambda completions, **kw: [0.0]])
    with pytest.raises(ConfigError, match="online RL"):
        SFTTrainer(reward_funcs=[style])


def test_recipe_forms_and_errors(tiny_model_dir, tmp_path):
    path_cfg = load_recipe("grpo", REPO / "recipes" / "grpo_tiny.yaml", ["grpo.beta=0.05"])
    obj_cfg = load_recipe(GRPOTrainer, path_cfg, ["optim.lr=1e-3"])
    assert obj_cfg.grpo.beta == 0.05 and obj_cfg.optim.lr == 1e-3
    assert path_cfg.optim.lr != 1e-3  # the object given is copied, not changed
    with pytest.raises(ConfigError, match="did you mean 'optim.lr'"):
        load_recipe("sft", {"optim": {"lrr": 1}})
    with pytest.raises(ConfigError, match="expected a GRPORecipe"):
        load_recipe("grpo", load_recipe("sft"))
    with pytest.raises(ConfigError, match="unknown algorithm"):
        load_recipe("sftt")
    with pytest.raises(ConfigError, match="model.name_or_path is required"):
        SFTTrainer(overrides=[f"train.output_dir={tmp_path}"]).train()
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with pytest.raises(ConfigError, match="model.dtype applies when posttrain loads the model"):
        SFTTrainer(
            overrides=["model.dtype=bfloat16", f"train.output_dir={tmp_path}"], model=model
        ).prepare()


def test_import_posttrain_is_light():
    code = (
        "import sys, posttrain\n"
        "from posttrain import load_recipe\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules\n"
        "print(sorted(n for n in posttrain.__all__ if n.endswith('Trainer')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    for name in ("SFTTrainer", "RewardTrainer", "DPOTrainer", "GRPOTrainer", "PPOTrainer"):
        assert name in out.stdout
