"""A normal `pip install`: the wheel ships the package and the bundled recipes, and installs into
a fresh venv that already has the CPU torch without pulling a CUDA build.

The fast tests build the wheel from a copy of the source (a build in the checkout would leave
build/ behind) and read its file list; the slow one installs it into a new venv and runs the
installed `posttrain` from a directory outside the checkout.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ("posttrain", "recipes", "pyproject.toml", "setup.py", "README.md")
TORCH = "torch==2.13.0+cpu"  # the local CPU wheel, as `make install` installs it


def build_wheel(tmp: Path) -> Path:
    src = tmp / "src"
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            src.mkdir(parents=True, exist_ok=True)
            shutil.copy(ROOT / name, src / name)
    dist = tmp / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
        + ["-w", str(dist), str(src)],
        check=True,
        capture_output=True,
    )
    (wheel,) = dist.glob("posttrain-*.whl")
    return wheel


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    return build_wheel(tmp_path_factory.mktemp("wheel"))


def test_wheel_ships_every_module_and_recipe(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {str(p.relative_to(ROOT)) for p in (ROOT / "posttrain").rglob("*.py")}
    missing = sorted(m for m in modules if "__pycache__" not in m and m not in names)
    assert not missing, f"modules left out of the wheel: {missing}"
    recipes = {str(p.relative_to(ROOT / "recipes")) for p in (ROOT / "recipes").rglob("*.yaml")}
    shipped = {n[len("posttrain/recipes/") :] for n in names if n.startswith("posttrain/recipes/")}
    assert recipes and recipes <= shipped, f"recipes not shipped: {sorted(recipes - shipped)}"
    assert not any(n.startswith(("tests/", "bench/")) for n in names)


def test_demo_finds_the_checkout_recipes():
    from posttrain.demo import recipe_path

    assert recipe_path("sft_tiny.yaml") == ROOT / "recipes" / "sft_tiny.yaml"


def _run(args: list, cwd: Path, env: dict) -> str:
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{args} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.mark.slow
def test_wheel_installs_in_a_fresh_venv_and_runs(wheel, tmp_path):
    """~2 min: a new venv, the CPU torch first (the README's install order), then the wheel with
    its dependencies from the registry. torch must stay the CPU build and no nvidia package may
    come in; the installed command then runs from outside the checkout."""
    venv = tmp_path / "venv"
    subprocess.run([sys._base_executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env['PATH']}"
    work = tmp_path / "work"
    work.mkdir()
    _run([*pip, TORCH], work, env)
    _run([*pip, str(wheel)], work, env)
    listed = json.loads(_run([*pip[:-2], "list", "--format", "json"], work, env))
    versions = {p["name"].lower(): p["version"] for p in listed}
    assert versions["torch"].endswith("+cpu"), versions["torch"]
    assert not [n for n in versions if n.startswith("nvidia")], sorted(versions)

    posttrain = str(venv / "bin" / "posttrain")
    assert "init-model" in _run([posttrain, "--help"], work, env)
    _run([posttrain, "init-model", "runs/tiny-init"], work, env)
    _run([posttrain, "data", "arithmetic", "runs/data", "--n", "200", "--n-test", "20"], work, env)
    python = str(venv / "bin" / "python")
    found = _run(
        [
            python,
            "-c",
            "from posttrain.demo import recipe_path; print(recipe_path('sft_tiny.yaml'))",
        ],
        work,
        env,
    ).strip()
    assert found.startswith(str(venv)), found  # the packaged copy, not a checkout's
    # the demo's sft stage recipe, shortened, from the installed package
    out = _run(
        [posttrain, "sft", found, "train.max_steps=3", "train.eval_every=0"]
        + ["train.save_every=0", "logging.progress=false"],
        work,
        env,
    )
    assert (work / "runs" / "sft-tiny" / "final" / "config.json").is_file(), out
