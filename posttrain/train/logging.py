"""Metrics to `OUTPUT_DIR/metrics.jsonl` (one JSON object per logged step), optional
TensorBoard, and a rich progress bar. Only rank 0 writes or draws anything."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class MetricsLogger:
    """One JSON line per logged step. `resume_step`: the run resumed from a checkpoint of that
    step, so lines logged after it by the interrupted run are moved to metrics.dropped.jsonl
    before appending: every step appears once in metrics.jsonl."""

    def __init__(
        self,
        output_dir: str | Path,
        enabled: bool,
        tensorboard: bool = False,
        resume_step: int | None = None,
    ):
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self._file = None
        self._tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            truncate_after(self.path, resume_step)
        self._file = self.path.open("a" if resume_step is not None else "w")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise RuntimeError(
                    "logging.tensorboard=true needs the tensorboard package: pip install 'posttrain[tensorboard]'"
                ) from e
            self._tb = SummaryWriter(str(Path(output_dir) / "tb"))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        clean = {
            k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in metrics.items()
        }
        record = {"step": step, "time": round(time.time(), 3), **clean}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)):
                    self._tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()


def truncate_after(path: Path, step: int) -> int:
    """Keep the lines of `path` with step <= `step`; move later (and unreadable, e.g. a line
    cut by a kill) lines to `<name>.dropped.jsonl`. Returns how many lines moved. Written to a
    temporary file and renamed, so a kill here leaves either the old or the new file."""
    if not path.is_file():
        return 0
    kept, dropped = [], []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            keep = int(json.loads(line)["step"]) <= step
        except (ValueError, KeyError, TypeError):
            keep = False
        (kept if keep else dropped).append(line)
    if not dropped:
        return 0
    with path.with_suffix(".dropped.jsonl").open("a") as f:
        f.write("".join(line + "\n" for line in dropped))
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    tmp.replace(path)
    return len(dropped)


class ProgressBar:
    """A rich bar with the latest loss; a no-op on other ranks or when disabled."""

    def __init__(self, total: int, description: str, enabled: bool, start: int = 0):
        self._progress = None
        if not enabled:
            return
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            transient=False,
        )
        self._task = self._progress.add_task(description, total=total, completed=start, status="")
        self._progress.start()

    def update(self, completed: int, status: str = "") -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=completed, status=status)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
