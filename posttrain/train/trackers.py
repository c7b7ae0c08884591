"""Experiment trackers through Accelerate's tracker API (`Accelerator(log_with=...)`,
`init_trackers`, `accelerator.log`): TensorBoard, Weights & Biases, MLflow, trackio.

posttrain adds no sink of its own besides `metrics.jsonl` (train/logging.py, always on). What
this module adds around Accelerate:
- an up-front check that each requested tracker's package is installed (Accelerate silently
  drops a tracker whose package is missing), as a one-line error naming the extra to install;
- where each tracker writes: TensorBoard under OUTPUT_DIR/tb, W&B under OUTPUT_DIR/wandb
  (offline with WANDB_MODE=offline, as wandb itself reads it), MLflow in a SQLite store
  OUTPUT_DIR/mlflow.db with artifacts in OUTPUT_DIR/mlartifacts unless MLFLOW_TRACKING_URI
  points elsewhere;
- sample-completion tables of RL runs: always OUTPUT_DIR/samples.jsonl, plus a wandb/trackio
  Table, an MLflow table artifact and a TensorBoard text table where those trackers run.
trackio keeps its runs in its own store (TRACKIO_DIR, default ~/.cache/huggingface/trackio).

Imports nothing heavy at module level (the CLI checks extras before torch is loaded).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import warnings
from pathlib import Path
from typing import Any

from posttrain.errors import MissingExtraError, UserError, debug_enabled

# report_to name -> (import names that must be present, extra that brings them)
TRACKER_PACKAGES: dict[str, tuple[tuple[str, ...], str]] = {
    "tensorboard": (("tensorboard",), "tensorboard"),
    "wandb": (("wandb",), "wandb"),
    # a file-based store needs SQLAlchemy and alembic (the plain ./mlruns store is refused by
    # MLflow 3 unless MLFLOW_ALLOW_FILE_STORE is set); a tracking server needs neither.
    "mlflow": (("mlflow", "sqlalchemy", "alembic"), "mlflow"),
    "trackio": (("trackio",), "trackio"),
}
TRACKERS = tuple(TRACKER_PACKAGES)


class TrackerLoginError(UserError):
    """A tracker needs credentials the environment does not have."""


def requested_trackers(logging_cfg: Any) -> list[str]:
    """The Accelerate trackers a LoggingConfig asks for (jsonl is ours, always on), in order.
    `logging.tensorboard: true` (the older spelling) adds tensorboard."""
    names = [n for n in logging_cfg.report_to if n != "jsonl"]
    if getattr(logging_cfg, "tensorboard", False) and "tensorboard" not in names:
        names.append("tensorboard")
    return list(dict.fromkeys(names))


def check_trackers(logging_cfg: Any) -> list[str]:
    """Raise MissingExtraError naming the `pip install` for the first requested tracker whose
    packages are missing; return the requested trackers."""
    names = requested_trackers(logging_cfg)
    for name in names:
        modules, extra = TRACKER_PACKAGES[name]
        if name == "mlflow" and os.environ.get("MLFLOW_TRACKING_URI"):
            modules = ("mlflow",)  # the server stores the run
        missing = [m for m in modules if importlib.util.find_spec(m) is None]
        if missing:
            key = (
                "logging.tensorboard=true"
                if name == "tensorboard" and name not in logging_cfg.report_to
                else f"logging.report_to includes {name}"
            )
            raise MissingExtraError(
                f"{key} but {', '.join(missing)} is not installed: pip install 'posttrain[{extra}]'"
            )
    return names


def accelerator_kwargs(cfg: Any) -> dict:
    """`log_with` and `project_config` for the run's Accelerator (TensorBoard writes under the
    logging dir OUTPUT_DIR/tb)."""
    names = check_trackers(cfg.logging)
    if not names:
        return {}
    from accelerate.utils import ProjectConfiguration

    out = Path(cfg.train.output_dir)
    return {
        "log_with": names,
        "project_config": ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "tb")),
    }


def _flat_config(cfg: Any) -> dict[str, Any]:
    """The resolved recipe as flat `section.key` hyperparameters of scalar type (lists and
    mappings as JSON text), which every tracker accepts."""
    import dataclasses

    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(value, (bool, int, float, str)) or value is None:
            flat[prefix] = value
        else:
            flat[prefix] = json.dumps(value)

    walk("", dataclasses.asdict(cfg))
    return {k: ("" if v is None else v) for k, v in flat.items()}


def start_trackers(accelerator: Any, cfg: Any) -> list[str]:
    """Start the run of every requested tracker (call on every process: Accelerate starts them
    on the main one) and store the resolved recipe as its hyperparameters."""
    names = check_trackers(cfg.logging)
    if not names:
        return []
    have = {str(t) for t in accelerator.log_with}
    missing = [n for n in names if n not in have]
    if missing:
        from posttrain.config import ConfigError

        raise ConfigError(
            f"logging.report_to asks for {', '.join(missing)} but the Accelerator was built "
            "without it: build it with posttrain.train.distributed.make_accelerator(cfg)"
        )
    out = Path(cfg.train.output_dir).resolve()
    run_name = cfg.logging.run_name or out.name
    init_kwargs: dict[str, dict] = {
        "wandb": {"name": run_name, "dir": str(out)},
        "mlflow": {"run_name": run_name},
        "trackio": {"name": run_name},
    }
    if "mlflow" in names and accelerator.is_main_process:
        _point_mlflow_at(out, init_kwargs["mlflow"])
    if "wandb" in names:
        out.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        # MLflow's SQL store and some tracker versions warn about their own dependencies.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        try:
            accelerator.init_trackers(
                cfg.logging.project, config=_flat_config(cfg), init_kwargs=init_kwargs
            )
        except Exception as e:
            if type(e).__module__.startswith("wandb") and "API key" in str(e):
                raise TrackerLoginError(
                    "logging.report_to includes wandb but W&B has no login: run `wandb login`, "
                    "set WANDB_API_KEY, or log offline with WANDB_MODE=offline"
                ) from e
            raise
    return names


def _point_mlflow_at(out: Path, kwargs: dict) -> None:
    """A SQLite store and an artifact folder in the output dir, unless MLFLOW_TRACKING_URI says
    where runs go. MLflow's INFO lines (creating tables) go to the debug log."""
    import mlflow

    if not debug_enabled():
        logging.getLogger("mlflow").setLevel(logging.WARNING)
        logging.getLogger("alembic").setLevel(logging.WARNING)
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return
    out.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(f"sqlite:///{out / 'mlflow.db'}")
    kwargs["logging_dir"] = str(out / "mlartifacts")


def tracker_values(metrics: dict) -> dict[str, float]:
    """The numeric entries of a metrics record (None and text are for metrics.jsonl only)."""
    return {
        k: v
        for k, v in metrics.items()
        if isinstance(v, (int, float)) and not (isinstance(v, float) and math.isinf(v))
    }


def log_sample_table(accelerator: Any, step: int, rows: list[dict]) -> None:
    """A table of sample completions to each tracker (main process only): wandb and trackio
    Table `samples`, MLflow artifact samples/step_NNNNNN.json, TensorBoard text `samples`.
    (samples.jsonl always has them.)"""
    if not rows or not accelerator.is_main_process:
        return
    columns = list(dict.fromkeys(k for row in rows for k in row))
    data = [[row.get(c) for c in columns] for row in rows]
    for tracker in accelerator.trackers:
        if tracker.name == "wandb":
            tracker.log_table("samples", columns=columns, data=data, step=step)
        elif tracker.name == "mlflow":
            import mlflow

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # pandas dtype notices inside log_table
                mlflow.log_table(
                    {c: [row.get(c) for row in rows] for c in columns},
                    artifact_file=f"samples/step_{step:06d}.json",
                )
        elif tracker.name == "trackio":
            import trackio

            tracker.run.log({"samples": trackio.Table(columns=columns, data=data)}, step=step)
        elif tracker.name == "tensorboard":
            tracker.writer.add_text("samples", _markdown_table(columns, data), global_step=step)
            tracker.writer.flush()


def _markdown_table(columns: list[str], data: list[list]) -> str:
    def cell(value: Any) -> str:
        text = f"{value:.4g}" if isinstance(value, float) else str(value)
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in data]
    return "\n".join(lines)


def finish_trackers(accelerator: Any) -> None:
    """End every tracker's run (not `end_training`, which also tears down the process group)
    and forget them, so an Accelerator used for another run starts fresh ones."""
    for tracker in accelerator.trackers:
        tracker.finish()
    accelerator.trackers = []
