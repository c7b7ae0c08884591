"""Shared fixtures: a tiny model and the bundled task, made once per test session on disk and
loaded back through from_pretrained, exactly as a user's checkpoint would be."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from posttrain.models.presets import init_model

    return init_model(tmp_path_factory.mktemp("models") / "tiny", "tiny")


@pytest.fixture(scope="session")
def arithmetic_dir(tmp_path_factory) -> Path:
    from posttrain.data.arithmetic import make_arithmetic

    out = tmp_path_factory.mktemp("data") / "arithmetic"
    make_arithmetic(out, n=2000, n_test=200, seed=0)
    return out


def run_cli(*args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run `python -m posttrain ARGS` in a fresh process, as a user would."""
    full_env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "posttrain", *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
        cwd=REPO,
    )


def sft_overrides(model_dir: Path, data_dir: Path, out: Path, **extra) -> list[str]:
    """Overrides that make recipes/sft_tiny.yaml small and fast for tests."""
    values = {
        "model.name_or_path": model_dir,
        "data.train_path": data_dir / "sft_train.jsonl",
        "data.eval_path": "",
        "train.output_dir": out,
        "train.max_steps": 4,
        "train.batch_size": 8,
        "train.save_every": 0,
        "train.eval_every": 0,
        "logging.log_every": 1,
        "logging.progress": False,
        "optim.warmup_steps": 1,
        **extra,
    }
    return [f"{k}={v}" for k, v in values.items()]
