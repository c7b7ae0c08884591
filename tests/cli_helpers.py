"""Helpers shared by the top-level tests (a uniquely named module: every test folder has its own
conftest.py, so `from conftest import ...` would pick whichever was imported first)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


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


def free_port() -> int:
    """A TCP port nobody listens on now, so concurrent test runs never share a rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_torchrun(
    *args: str, nproc: int = 2, env: dict | None = None, timeout: int = 600
) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node NPROC -m posttrain ARGS` on CPU (gloo), as a user would."""
    full_env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        # a child that aborts in C++ still prints every thread's Python stack
        "PYTHONFAULTHANDLER": "1",
        **(env or {}),
    }
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(nproc),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        "-m",
        "posttrain",
        *args,
    ]
    return show_failure(
        subprocess.run(
            command, capture_output=True, text=True, env=full_env, timeout=timeout, cwd=REPO
        )
    )


def show_failure(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    """A failed multi-process launch prints its whole output, which pytest shows under the
    failing test ("Captured stdout call"): assertion messages keep only the tail, and a
    child's faulthandler stacks come before the launcher's own report."""
    if result.returncode != 0:
        print(f"$ {' '.join(map(str, result.args))}\n{result.stdout}\n{result.stderr}")
    return result


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
