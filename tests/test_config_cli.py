"""Discoverable config: `posttrain config show|keys`, the recipe sections in a trainer's --help,
and shell completion that answers without importing torch."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import yaml
from cli_helpers import REPO
from typer.testing import CliRunner

from posttrain.algorithms import ALGORITHMS
from posttrain.cli import app
from posttrain.config import load_recipe
from posttrain.config_docs import commented_yaml, field_docs, first_line, recipe_keys

runner = CliRunner()


def leaf_keys(tree: dict, prefix: str = "") -> set[str]:
    keys = set()
    for key, value in tree.items():
        if isinstance(value, dict) and value and key != "params":
            keys |= leaf_keys(value, f"{prefix}{key}.")
        else:
            keys.add(f"{prefix}{key}")
    return keys


def test_config_show_grpo_prints_every_key_and_loads_back():
    result = runner.invoke(app, ["config", "show", "grpo"])
    assert result.exit_code == 0, result.output
    printed = yaml.safe_load(result.output)
    expected = dataclasses.asdict(load_recipe(ALGORITHMS["grpo"][0], None))
    assert printed == expected  # every key, every default, nothing else
    keys = {k.key for k in recipe_keys(ALGORITHMS["grpo"][0]) if "[]" not in k.key}
    assert leaf_keys(printed) == keys and len(keys) > 60
    # each field's docstring is the comment above it
    lines = result.output.splitlines()
    doc = first_line(field_docs(type(ALGORITHMS["grpo"][0]().grpo))["beta"])
    beta = next(i for i, line in enumerate(lines) if line.strip().startswith("beta:"))
    assert lines[beta - 1].strip().startswith("# ") and doc.split()[0] in lines[beta - 1]


def test_config_show_resolves_recipe_and_overrides(tmp_path):
    recipe = REPO / "recipes" / "grpo_tiny.yaml"
    result = runner.invoke(app, ["config", "show", "grpo", str(recipe), "grpo.beta=0.04"])
    assert result.exit_code == 0, result.output
    cfg = load_recipe(ALGORITHMS["grpo"][0], recipe, ["grpo.beta=0.04"])
    assert yaml.safe_load(result.output) == dataclasses.asdict(cfg)
    assert cfg.grpo.beta == 0.04 and cfg.model.name_or_path == "runs/sft-tiny-weak/final"
    # the output is itself a recipe that loads to the same config
    saved = tmp_path / "resolved.yaml"
    saved.write_text(result.output)
    assert load_recipe(ALGORITHMS["grpo"][0], saved) == cfg
    # overrides without a recipe file
    only = runner.invoke(app, ["config", "show", "sft", "optim.lr=3e-4"])
    assert yaml.safe_load(only.output)["optim"]["lr"] == 3e-4


@pytest.mark.parametrize("algorithm", sorted(ALGORITHMS))
def test_commented_yaml_round_trips(algorithm):
    cfg = ALGORITHMS[algorithm][0]()
    assert yaml.safe_load(commented_yaml(cfg)) == dataclasses.asdict(cfg)
    assert all(k.doc for k in recipe_keys(type(cfg))), "a key without a docstring"


def test_config_show_errors_are_one_line():
    bad = runner.invoke(app, ["config", "show", "sft", "optim.lrr=1"])
    assert bad.exit_code == 2 and "did you mean 'optim.lr'" in bad.output
    unknown = runner.invoke(app, ["config", "keys", "sftt"])
    assert unknown.exit_code == 2 and "unknown algorithm 'sftt'" in unknown.output


def test_config_keys_lists_every_key_with_type_default_doc():
    table = runner.invoke(app, ["config", "keys", "sft"])
    assert table.exit_code == 0, table.output
    keys = recipe_keys(ALGORITHMS["sft"][0])
    lines = table.output.splitlines()
    assert lines[0].split() == ["key", "type", "default", "doc"]
    assert len(lines) == len(keys) + 1
    row = next(line for line in lines if line.startswith("train.batch_size "))
    assert "int >= 1" in row and " 8 " in row and "micro-batch per process" in row
    rows = runner.invoke(app, ["config", "keys", "grpo", "--json"]).output.splitlines()
    parsed = [json.loads(r) for r in rows]
    assert [p["key"] for p in parsed] == [k.key for k in recipe_keys(ALGORITHMS["grpo"][0])]
    rewards = {p["key"]: p for p in parsed if p["key"].startswith("grpo.rewards")}
    assert rewards["grpo.rewards"]["default"] == [{"name": "accuracy", "weight": 1.0, "params": {}}]
    assert "grpo.rewards[].weight" in rewards


def test_trainer_help_lists_sections_and_points_to_config():
    result = runner.invoke(app, ["grpo", "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    for section, doc in [("grpo", "Online RL settings."), ("dapo", "DAPO dynamic sampling")]:
        assert any(
            line.split()[:1] == [section] and doc in line for line in result.output.splitlines()
        )
    assert "posttrain config keys grpo" in result.output
    assert "posttrain config show grpo [RECIPE] [KEY=VALUE ...]" in result.output


def test_shell_completion_lists_commands_without_torch():
    """Completion is on, and completing a command name does not import torch (each TAB)."""
    code = (
        "import sys; sys.argv = ['posttrain']\n"
        "from posttrain.cli import main\n"
        "try:\n    main()\nfinally:\n    print('TORCH', 'torch' in sys.modules)\n"
    )
    env = {
        **os.environ,
        "_POSTTRAIN_COMPLETE": "complete_bash",
        "COMP_WORDS": "posttrain g",
        "COMP_CWORD": "1",
    }
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO
    )
    assert "grpo" in out.stdout.split() and "TORCH False" in out.stdout, out.stdout + out.stderr
    help_text = runner.invoke(app, ["--help"]).output
    assert "--install-completion" in help_text
