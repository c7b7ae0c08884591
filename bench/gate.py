"""Pausing a benchmark run between optimizer steps, so that one process per side serves all pairs.

Starting a side costs ~8-10 s (imports, model and data loading), as much as the timed steps of
a short case; with a fresh process per run that start-up was most of `make bench`'s time. So
each side runs once per case, warm-up steps first, then one segment of timed steps per ABBA
pair; after each segment but the last the process stops at the gate until the harness lets it
go on, while the other side runs its segment. A stopped process is blocked in `os.read` and
uses no CPU.

The harness side (`GatedProcess`) passes two pipe ends to the child and names them in
BENCH_GATE ("READY_FD,GO_FD") and the steps to stop after in BENCH_GATE_STOPS ("3,5,7"). The
child (`Gate.from_env`) writes the step number to READY after each listed step and reads one
byte from GO before going on. Time spent at the gate is not step time: TRL's step timer
restarts after the gate (bench/trl_runner.py); posttrain's `step_time` includes the wait, so
the child records the seconds waited per step in BENCH_GATE_WAITS (JSON) and the harness
subtracts them (`subtract_waits`).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path


class Gate:
    """The child's end: stop after each step in `stops` until the harness says go."""

    def __init__(self, ready_fd: int, go_fd: int, stops: set[int], waits_path: str | None):
        self.ready_fd, self.go_fd, self.stops = ready_fd, go_fd, stops
        self.waits_path = waits_path
        self.waited: dict[int, float] = {}

    @classmethod
    def from_env(cls) -> Gate | None:
        fds = os.environ.get("BENCH_GATE")
        if not fds:
            return None
        ready, go = (int(x) for x in fds.split(","))
        stops = {int(s) for s in os.environ.get("BENCH_GATE_STOPS", "").split(",") if s}
        return cls(ready, go, stops, os.environ.get("BENCH_GATE_WAITS"))

    def after_step(self, step: int) -> float:
        """Called after optimizer step `step` (1-based); returns the seconds spent waiting."""
        if step not in self.stops:
            return 0.0
        started = time.perf_counter()
        os.write(self.ready_fd, f"{step}\n".encode())
        if os.read(self.go_fd, 1) == b"":  # the harness is gone: nobody will time the rest
            raise SystemExit("bench gate: the harness closed the pipe")
        self.waited[step] = time.perf_counter() - started
        if self.waits_path:
            Path(self.waits_path).write_text(json.dumps(self.waited))
        return self.waited[step]

    # posttrain's loop calls this on every process after each optimizer step (train/loop.py).
    def on_step_end(self, step: int, state) -> None:
        self.after_step(step)


def install_posttrain_gate() -> Gate | None:
    """Add the gate to the callbacks of every posttrain.train.loop.train call in this process
    (the CLI reaches it through posttrain.api, which imports `train` when it trains)."""
    gate = Gate.from_env()
    if gate is None:
        return None
    import posttrain.train.loop as loop

    plain = loop.train

    def train_with_gate(cfg, algorithm, accelerator=None, callbacks=()):
        return plain(cfg, algorithm, accelerator, callbacks=(*callbacks, gate))

    loop.train = train_with_gate
    return gate


def subtract_waits(step_times: list[float], waits_path: Path) -> list[float]:
    """posttrain's step times without the seconds its process waited at the gate."""
    if not waits_path.is_file():
        return step_times
    waited = {int(k): v for k, v in json.loads(waits_path.read_text()).items()}
    return [t - waited.get(i + 1, 0.0) for i, t in enumerate(step_times)]


class GatedProcess:
    """The harness's end: a child that stops after each step in `stops` (see module doc)."""

    def __init__(self, argv: list[str], log: Path, env: dict, cwd: Path, stops: list[int]):
        self.log, self.stops = log, list(stops)
        log.parent.mkdir(parents=True, exist_ok=True)
        ready_r, ready_w = os.pipe()
        go_r, go_w = os.pipe()
        env = dict(env, BENCH_GATE=f"{ready_w},{go_r}")
        env["BENCH_GATE_STOPS"] = ",".join(str(s) for s in stops)
        self._out = log.open("w")
        self.proc = subprocess.Popen(argv, stdout=self._out, stderr=subprocess.STDOUT, env=env,
                                     cwd=cwd, pass_fds=(ready_w, go_r))  # fmt: skip
        os.close(ready_w)  # the child holds the only write end: EOF means it exited
        os.close(go_r)
        self.ready = os.fdopen(ready_r, "r")
        self.go = go_w
        self.argv = argv

    def wait_stop(self) -> int:
        """Block until the child stops at its next gate; returns the step it stopped after."""
        expected = self.stops.pop(0)
        line = self.ready.readline()
        if not line:
            self.finish()  # raises with the log's tail when the child failed
            raise RuntimeError(f"{self.argv[:4]} exited before its gate at step {expected}")
        step = int(line)
        if step != expected:
            raise RuntimeError(f"gate: child stopped after step {step}, expected {expected}")
        return step

    def release(self) -> None:
        os.write(self.go, b"g")

    def finish(self):
        """Wait for the child to exit; returns its rusage (raises if it failed)."""
        _, status, usage = os.wait4(self.proc.pid, 0)  # this child's own rusage
        self.proc.returncode = os.waitstatus_to_exitcode(status)
        self._out.close()
        self.ready.close()
        os.close(self.go)
        if self.proc.returncode != 0:
            tail = "\n".join(self.log.read_text().splitlines()[-30:])
            raise RuntimeError(
                f"{' '.join(self.argv)} failed ({self.proc.returncode}); see {self.log}:\n{tail}"
            )
        return usage
