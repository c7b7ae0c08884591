"""`posttrain plot RUN_DIR [RUN_DIR ...]`: training curves of several runs overlaid.

Reads each run's `metrics.jsonl` (train/logging.py) and draws one subplot per metric with one
solid line per run. Evaluation results (`eval/METRIC`, logged every train.eval_every steps) are
marked points joined by a dashed line in the run's colour: on METRIC's subplot when it is
shown too (eval loss over train loss), else on their own subplot. Needs matplotlib (the `plot`
extra); imports no torch, so it is quick.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from posttrain.errors import MissingExtraError, UserError

# Shown when --metrics is not given, in this order, where at least one run logged them.
DEFAULT_METRICS = (
    "loss",
    "token_accuracy",
    "rewards/mean",
    "accuracy",
    "rewards_accuracy",
    "kl",
    "completion_length",
)


class PlotError(UserError):
    """A run directory without metrics, or a metric no run logged."""


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The records of RUN_DIR/metrics.jsonl (a path to the file itself also works)."""
    path = Path(run_dir)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        raise PlotError(f"{run_dir}: no metrics.jsonl (expected a train.output_dir of a run)")
    records = []
    lines = path.read_text().splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError:
            # a run killed mid-write leaves a cut last line; anything else is not ours
            if number == len(lines):
                continue
            raise PlotError(f"{path}:{number}: not a JSON line") from None
    if not records:
        raise PlotError(f"{path}: no records yet")
    return records


def series(records: list[dict], metric: str) -> tuple[list[int], list[float]]:
    """(steps, values) of `metric`, skipping steps where it is missing or not finite."""
    steps, values = [], []
    for r in records:
        value = r.get(metric)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if math.isfinite(value):
                steps.append(int(r["step"]))
                values.append(float(value))
    return steps, values


def choose_metrics(runs: dict[str, list[dict]], metrics: list[str] | None) -> list[str]:
    logged = {k for records in runs.values() for r in records for k in r}
    if metrics:
        unknown = [m for m in metrics if m not in logged and f"eval/{m}" not in logged]
        if unknown:
            numeric = sorted(k for k in logged if k not in ("step", "time"))
            raise PlotError(f"no run logged {', '.join(unknown)} (logged: {', '.join(numeric)})")
        return metrics
    chosen = [m for m in DEFAULT_METRICS if m in logged or f"eval/{m}" in logged]
    return chosen or ["loss"]


def run_labels(run_dirs: list[str | Path]) -> list[str]:
    """Each run's directory name; the full path where names repeat."""
    names = [Path(d).name or str(d) for d in run_dirs]
    return [n if names.count(n) == 1 else str(d) for n, d in zip(names, run_dirs)]


def build_figure(run_dirs: list[str | Path], metrics: list[str] | None = None):
    """A matplotlib Figure: one axes per metric, one line per run (eval metrics as points)."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise MissingExtraError(
            "posttrain plot needs matplotlib: pip install 'posttrain[plot]'"
        ) from None
    if not run_dirs:
        raise PlotError("give at least one run directory")
    labels = run_labels(run_dirs)
    runs = {label: read_metrics(d) for label, d in zip(labels, run_dirs)}
    chosen = choose_metrics(runs, metrics)
    cols = min(len(chosen), 2)
    rows = math.ceil(len(chosen) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 3.6 * rows), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, metric in zip(axes.flat, chosen):
        evals = metric if metric.startswith("eval/") else f"eval/{metric}"
        for i, (label, records) in enumerate(runs.items()):
            color = colors[i % len(colors)]
            steps, values = series(records, metric)
            if steps and metric != evals:
                ax.plot(steps, values, color=color, label=label)
            steps, values = series(records, evals)
            if steps:
                ax.plot(
                    steps,
                    values,
                    color=color,
                    label=f"{label} (eval)",
                    marker="o",
                    linestyle="--",
                    markersize=5,
                )
        ax.set_title(metric)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(chosen) :]:
        ax.set_visible(False)
    fig.tight_layout()
    return fig


def plot_runs(
    run_dirs: list[str | Path], out: str | Path, metrics: list[str] | None = None
) -> Path:
    """Write the figure of `build_figure` to `out` (PNG, or any format matplotlib knows from
    the suffix); returns the path."""
    import matplotlib.pyplot as plt

    fig = build_figure(run_dirs, metrics)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
