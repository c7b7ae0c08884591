"""The README's quick start runs as written, and the bundled recipes chain: every model and data
path a recipe reads is one that an earlier command writes.

The fast tests follow the paths without training; the slow one runs the quick-start lines
verbatim in a fresh directory (with `recipes/` linked in, as in a checkout).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
RECIPES = ROOT / "recipes"
# What `posttrain data arithmetic DIR` writes (posttrain/data/arithmetic.py)
DATA_FILES = [
    f"{kind}_{split}.jsonl"
    for kind in ("sft", "prompt_completion", "preference", "kto", "rl")
    for split in ("train", "test")
] + ["preference_all_train.jsonl"]


def quickstart_commands() -> list[str]:
    """The command lines of the first ```bash block under '## Quick start', comments dropped."""
    text = README.read_text()
    section = text.split("\n## Quick start\n", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block, "README: no ```bash block under '## Quick start'"
    lines = [line.split("#", 1)[0].strip() for line in block.group(1).splitlines()]
    return [line for line in lines if line]


def _load(algorithm: str, recipe: str, overrides: list[str]):
    from posttrain.algorithms import ALGORITHMS
    from posttrain.config import load_recipe

    return load_recipe(ALGORITHMS[algorithm][0], RECIPES / Path(recipe).name, overrides)


def _follow(commands: list[str]) -> list[str]:
    """Walk the commands, tracking the paths they write; return the reads nothing wrote."""
    from posttrain.algorithms import ALGORITHMS

    written: set[str] = set()
    unmet = []

    def read(path: str, by: str) -> None:
        if path and os.path.normpath(path) not in written:
            unmet.append(f"{by}: reads {path}, which no earlier command writes")

    for line in commands:
        words = shlex.split(line)
        assert words[0] == "posttrain", f"quick start line is not a posttrain command: {line}"
        command, args = words[1], [w for w in words[2:] if not w.startswith("--")]
        if command == "init-model":
            written.add(os.path.normpath(args[0]))
        elif command == "data":
            written.update(os.path.normpath(f"{args[1]}/{name}") for name in DATA_FILES)
        elif command == "eval":
            read(args[0], line)
            read(args[1], line)
        elif command in ALGORITHMS:
            cfg = _load(command, args[0], args[1:])
            read(cfg.model.name_or_path, line)
            read(cfg.data.train_path, line)
            read(cfg.data.eval_path, line)
            written.add(os.path.normpath(f"{cfg.train.output_dir}/final"))
        else:
            raise AssertionError(f"quick start: unexpected command {line}")
    return unmet


def test_quickstart_paths_chain():
    commands = quickstart_commands()
    assert any(c.startswith("posttrain grpo") for c in commands)
    assert _follow(commands) == []


def test_follow_catches_a_broken_chain():
    """The check above can fail: a recipe that reads the old weak-SFT path is reported."""
    broken = [
        "posttrain init-model runs/tiny-init",
        "posttrain data arithmetic runs/data",
        "posttrain sft recipes/sft_tiny_weak.yaml",
        "posttrain dpo recipes/dpo_tiny.yaml model.name_or_path=runs/sft-weak/final",
    ]
    assert _follow(broken) == [
        f"{broken[-1]}: reads runs/sft-weak/final, which no earlier command writes"
    ]


def test_every_bundled_recipe_reads_what_another_writes():
    """Each recipe's model is an init-model output (runs/*-init) or some recipe's final/."""
    from posttrain.algorithms import ALGORITHMS
    from posttrain.config import read_yaml

    finals, reads = set(), {}
    for path in sorted(RECIPES.glob("*.yaml")):
        data = read_yaml(path)
        finals.add(os.path.normpath(f"{data['train']['output_dir']}/final"))
        reads[path.name] = data["model"]["name_or_path"]
    unmet = {
        name: model
        for name, model in reads.items()
        if not re.fullmatch(r"runs/[\w-]+-init", model) and os.path.normpath(model) not in finals
    }
    assert unmet == {}
    assert ALGORITHMS  # the registry the quick-start walk uses is importable


@pytest.mark.slow
def test_quickstart_runs_verbatim(tmp_path):
    """Minutes: the README's quick-start lines, unchanged, in a fresh directory."""
    (tmp_path / "recipes").symlink_to(RECIPES)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    for line in quickstart_commands():
        done = subprocess.run(
            ["bash", "-c", line], cwd=tmp_path, env=env, capture_output=True, text=True
        )
        assert done.returncode == 0, f"{line}\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
    for final in ("sft-tiny", "sft-tiny-weak", "grpo-tiny", "dpo-tiny"):
        assert (tmp_path / "runs" / final / "final" / "config.json").is_file()
    assert '"accuracy"' in done.stdout  # the last line: posttrain eval prints its JSON
