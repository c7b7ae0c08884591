"""The subprocess sandbox for code-executing rewards: limits hold and the caller survives."""

from __future__ import annotations

import time
from pathlib import Path

from posttrain.scoring.sandbox import run_in_subprocess


def test_correct_program():
    ok, stdout = run_in_subprocess("print(sum(range(10)))", timeout_s=10, memory_mb=512)
    assert ok and stdout.strip() == "45"


def test_failing_program_keeps_its_output():
    ok, stdout = run_in_subprocess(
        "print('partial')\nraise ValueError('x')", timeout_s=10, memory_mb=512
    )
    assert not ok and stdout.strip() == "partial"


def test_runs_isolated_in_a_temporary_directory(tmp_path):
    code = "import os, sys; print(os.getcwd()); print(sys.flags.isolated); print(sys.stdin.read())"
    ok, stdout = run_in_subprocess(code, timeout_s=10, memory_mb=512)
    cwd, isolated, stdin = (stdout.split("\n") + ["", "", ""])[:3]
    assert ok and "posttrain-sandbox-" in cwd and isolated == "1" and stdin == ""


def test_infinite_loop_is_killed_by_the_timeout():
    ok, stdout = run_in_subprocess(
        "import time\nprint('start', flush=True)\nwhile True: time.sleep(0.01)",
        timeout_s=0.5,
        memory_mb=512,
    )
    assert not ok and stdout.strip() == "start"


def test_busy_loop_is_killed():
    ok, _ = run_in_subprocess("while True: pass", timeout_s=0.5, memory_mb=512)
    assert not ok


def test_memory_hog_is_killed():
    ok, _ = run_in_subprocess(
        "x = bytearray(4 * 1024**3)\nprint('allocated')", timeout_s=10, memory_mb=256
    )
    assert not ok


def test_endless_output_is_bounded():
    ok, stdout = run_in_subprocess(
        "while True: print('x' * 1000)", timeout_s=5, memory_mb=512, max_output_bytes=1 << 16
    )
    assert not ok and len(stdout) <= 1 << 16


def test_helpers_left_behind_are_killed():
    code = "import subprocess, sys\nprint(subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']).pid)"
    ok, stdout = run_in_subprocess(code, timeout_s=10, memory_mb=512)
    assert ok
    assert _stops_running(int(stdout))


def _stops_running(pid: int, wait_s: float = 10.0) -> bool:
    """Whether `pid` is gone or a zombie (its adopter may never reap it) within `wait_s`; the
    SIGKILL is sent at once but takes a moment to land."""
    status = Path(f"/proc/{pid}/status")
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            if "State:\tZ" in status.read_text():
                return True
        except FileNotFoundError:
            return True
        time.sleep(0.02)
    return False
