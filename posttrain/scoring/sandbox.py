"""Run untrusted model-written Python in a separate, resource-limited process (spec §9), and
the `code_output` reward built on it.

Code-executing rewards must survive programs that loop forever, allocate without bound, print
without end or fork helpers. `run_in_subprocess` runs the code with `python -I -c` (isolated
mode: no user site-packages, no PYTHON* variables, no current directory on sys.path) in a new
session, inside a fresh temporary working directory, with no stdin and a minimal environment,
under these limits:

- RLIMIT_AS: address space of `memory_mb` MiB, so a memory hog gets MemoryError or dies;
- RLIMIT_CPU: CPU seconds of about `timeout_s`, a second guard next to the wall clock;
- RLIMIT_FSIZE: files (stdout goes to one) stop at `max_output_bytes`, so endless printing is
  bounded on disk and in the parent's memory;
- a wall-clock timeout, after which the whole process group is SIGKILLed (grandchildren too).

This is a guard against accidents, not a security boundary: the code can still read files the
user can read and use the network. Run it in a container when that matters.

The limits are set in `preexec_fn`, which runs between fork and exec. Python warns that
preexec_fn is not safe when other threads exist (the Scorer's timeout runs rewards in worker
threads); the risk is a lock held by another thread at fork time, and this one only calls
`resource.setrlimit` (imported at module load), which takes no Python-level lock.
"""

from __future__ import annotations

import math
import os
import re
import resource
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

_PYTHON_BLOCK = re.compile(r"```(?:python|py)[ \t]*\n(.*?)```", re.DOTALL)


def _limits(memory_mb: int, cpu_seconds: int, max_output_bytes: int):
    """A preexec_fn that applies the resource limits in the child before exec.

    Every tuple is built here, in the parent, and the address-space limit is set last: the
    forked child still has the parent's (possibly huge) address space, so after RLIMIT_AS it
    must not allocate before exec replaces the image."""
    cpu = (cpu_seconds, cpu_seconds + 1)
    output = (max_output_bytes, max_output_bytes)
    memory = (int(memory_mb) * 1024 * 1024,) * 2
    no_core = (0, 0)
    setrlimit = resource.setrlimit
    rlimit_cpu, rlimit_fsize = resource.RLIMIT_CPU, resource.RLIMIT_FSIZE
    rlimit_core, rlimit_as = resource.RLIMIT_CORE, resource.RLIMIT_AS

    def apply() -> None:
        setrlimit(rlimit_cpu, cpu)
        setrlimit(rlimit_fsize, output)
        setrlimit(rlimit_core, no_core)
        setrlimit(rlimit_as, memory)

    return apply


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_in_subprocess(
    code: str, timeout_s: float, memory_mb: int, max_output_bytes: int = 1 << 20
) -> tuple[bool, str]:
    """Run `code` in a sandboxed `python -I -c`; returns (ok, stdout).

    ok is True only when the program exited with status 0 before the wall-clock timeout and
    without hitting a limit. stdout is whatever it printed (decoded as UTF-8, bad bytes
    replaced), also when it failed; stderr is discarded.
    """
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8"}
    cpu_seconds = max(1, math.ceil(timeout_s))
    with tempfile.TemporaryDirectory(prefix="posttrain-sandbox-") as workdir:
        stdout_path = Path(workdir) / ".stdout"
        with open(stdout_path, "wb") as stdout_file:
            try:
                process = subprocess.Popen(
                    [sys.executable, "-I", "-c", code],
                    stdin=subprocess.DEVNULL,
                    stdout=stdout_file,
                    stderr=subprocess.DEVNULL,
                    cwd=workdir,
                    env=env,
                    start_new_session=True,  # its own process group, killed as a whole
                    preexec_fn=_limits(memory_mb, cpu_seconds, max_output_bytes),
                )
            # OSError: code longer than the OS argument limit; ValueError: a NUL byte in it;
            # SubprocessError: the limits could not be applied.
            except (OSError, ValueError, subprocess.SubprocessError):
                return False, ""
            try:
                returncode = process.wait(timeout=timeout_s)
                timed_out = False
            except subprocess.TimeoutExpired:
                timed_out = True
                returncode = None
            _kill_group(process.pid)  # also kills helpers left behind by a program that exited
            process.wait()
        with open(stdout_path, "rb") as stdout_file:
            stdout = stdout_file.read(max_output_bytes).decode("utf-8", errors="replace")
    return (not timed_out and returncode == 0), stdout


def extract_python_block(text: str) -> str | None:
    """The last fenced ```python (or ```py) block of a completion, else None."""
    blocks = _PYTHON_BLOCK.findall(text)
    return blocks[-1] if blocks else None


def make_code_output(
    timeout_s: float = 5.0, memory_mb: int = 512, max_workers: int | None = None
) -> Callable[..., list[float]]:
    """1.0 when the completion's last ```python block, run in the sandbox, prints exactly column
    `expected_output` (both stripped); 0.0 when it prints something else, fails or has no block.
    Programs run in parallel subprocesses (threads only wait on them)."""

    def score_one(completion: str, expected) -> float:
        code = extract_python_block(completion)
        if code is None:
            return 0.0
        ok, stdout = run_in_subprocess(code, timeout_s=timeout_s, memory_mb=memory_mb)
        return float(ok and stdout.strip() == str(expected).strip())

    def code_output(prompts: list, completions: list[str], **columns) -> list[float]:
        expected = columns.get("expected_output")
        if expected is None:
            raise KeyError("reward 'code_output' needs a column 'expected_output'")
        if len(expected) != len(completions):
            raise ValueError(
                f"code_output: {len(completions)} completions, {len(expected)} expected outputs"
            )
        workers = max(1, min(len(completions), max_workers or os.cpu_count() or 1))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            return list(pool.map(score_one, completions, expected))

    return code_output


code_output = make_code_output()
