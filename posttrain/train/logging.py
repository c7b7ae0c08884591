"""Metrics to `OUTPUT_DIR/metrics.jsonl` (one JSON object per logged step), the same numbers to
the experiment trackers the run started (train/trackers.py: Accelerate's `accelerator.log`),
sample completions of RL runs to `OUTPUT_DIR/samples.jsonl` (and tracker tables), and a rich
progress bar. Only rank 0 writes or draws anything."""

from __future__ import annotations

import json
import logging
import math
import time
import warnings
from pathlib import Path
from typing import Any

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from posttrain.errors import debug_enabled
from posttrain.train.trackers import finish_trackers, log_sample_table, tracker_values


class MetricsLogger:
    """One JSON line per logged step. `resume_step`: the run resumed from a checkpoint of that
    step, so lines logged after it by the interrupted run are moved to metrics.dropped.jsonl
    (samples.dropped.jsonl) before appending: every step appears once in metrics.jsonl.
    `accelerator`: forward every record to its started trackers, and finish them on close."""

    def __init__(
        self,
        output_dir: str | Path,
        enabled: bool,
        resume_step: int | None = None,
        accelerator: Any = None,
    ):
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self.samples_path = Path(output_dir) / "samples.jsonl"
        self.accelerator = accelerator
        self._file = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            truncate_after(self.path, resume_step)
            truncate_after(self.samples_path, resume_step)
        elif self.samples_path.exists():
            self.samples_path.unlink()  # a fresh run's samples, like its metrics.jsonl
        self._file = self.path.open("a" if resume_step is not None else "w")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if self.accelerator is not None and self.accelerator.trackers:
            self.accelerator.log(tracker_values(metrics), step=step)
        if not self.enabled:
            return
        clean = {
            k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in metrics.items()
        }
        record = {"step": step, "time": round(time.time(), 3), **clean}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def log_samples(self, step: int, rows: list[dict]) -> None:
        """Sample completions (prompt, completion, rewards, ...) of this step: one JSON line
        each in samples.jsonl, and a table to the trackers that show tables."""
        if not rows:
            return
        if self.accelerator is not None and self.accelerator.trackers:
            log_sample_table(self.accelerator, step, rows)
        if not self.enabled:
            return
        with self.samples_path.open("a") as f:
            f.write("".join(json.dumps({"step": step, **row}) + "\n" for row in rows))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self.accelerator is not None:
            finish_trackers(self.accelerator)


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
    """A rich bar with the latest loss; a no-op on other ranks or when disabled. Where the
    output is not a terminal (a log file, CI, `make demo | tee`), rich draws nothing until the
    end, so a plain line is printed instead at most every `plain_every_s` seconds."""

    def __init__(
        self,
        total: int,
        description: str,
        enabled: bool,
        start: int = 0,
        plain_every_s: float = 30.0,
    ):
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
        self._plain = not self._progress.console.is_terminal
        self._plain_every_s = plain_every_s
        self._description, self._total = description, total
        self._started = self._last_plain = time.monotonic()
        self._status = ""
        self._progress.start()

    def update(self, completed: int, status: str = "") -> None:
        if self._progress is None:
            return
        self._status = status or self._status
        self._progress.update(self._task, completed=completed, status=status)
        now = time.monotonic()
        # (the last step is drawn by rich itself when the bar stops)
        if (
            self._plain
            and completed < self._total
            and now - self._last_plain >= self._plain_every_s
        ):
            self._last_plain = now
            self._progress.console.print(
                f"{self._description} {completed}/{self._total} {self._status} "
                f"({now - self._started:.0f} s)",
                highlight=False,
            )

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()


# --------------------------------------------------------------------------------------------
# Library noise: to the debug log, shown with POSTTRAIN_DEBUG=1
# --------------------------------------------------------------------------------------------

_NOISE_CATEGORIES = (FutureWarning, DeprecationWarning, PendingDeprecationWarning)
debug_log = logging.getLogger("posttrain.debug")


class _SharedTensorNotice(logging.Filter):
    """Accelerate warns on every checkpoint that it "Removed shared tensor {'lm_head.weight'}"
    of a model with tied embeddings: expected (transformers re-ties them on load), so it goes
    to the debug log."""

    def filter(self, record: logging.LogRecord) -> bool:
        if "Removed shared tensor" not in record.getMessage():
            return True
        debug_log.debug(record.getMessage())
        return debug_enabled()


def _route_warning(message, category, filename, lineno, file=None, line=None):
    if issubclass(category, _NOISE_CATEGORIES) and not debug_enabled():
        debug_log.debug("%s:%s: %s: %s", filename, lineno, category.__name__, message)
        return
    _show_warning(message, category, filename, lineno, file, line)


_show_warning = warnings.showwarning


def quiet_library_noise(warnings_too: bool = True) -> None:
    """Route library deprecation notices (FutureWarning, DeprecationWarning) and Accelerate's
    per-save shared-tensor notice to the debug log; POSTTRAIN_DEBUG=1 shows them as before.
    `warnings_too=False`: only the save notice (for library use, where the caller owns the
    process's warning settings). Idempotent."""
    accelerate_logger = logging.getLogger("accelerate.utils.other")
    if not any(isinstance(f, _SharedTensorNotice) for f in accelerate_logger.filters):
        accelerate_logger.addFilter(_SharedTensorNotice())
    if warnings_too and warnings.showwarning is not _route_warning:
        warnings.showwarning = _route_warning
