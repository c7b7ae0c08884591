"""Experiment trackers through Accelerate (logging.report_to) and the RL samples table.

Real runs of the tiny model: one SFT run writes TensorBoard events, an MLflow SQLite store and an
offline W&B run, each holding the same losses as metrics.jsonl; a GRPO run writes samples.jsonl
whose rewards are those of the reward functions; a missing tracker package is a one-line error
before any model loads.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cli_helpers import REPO, run_cli, sft_overrides

from posttrain.config import LoggingConfig, load_recipe
from posttrain.train.trackers import TRACKER_PACKAGES, check_trackers, requested_trackers


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def need(*modules: str) -> None:
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"not installed: {missing} (pip install -e '.[dev]')")


def tensorboard_scalars(tb_dir: Path, tag: str) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    found: dict[int, float] = {}
    for events in tb_dir.rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events))
        acc.Reload()
        if tag in acc.Tags()["scalars"]:
            found.update({e.step: e.value for e in acc.Scalars(tag)})
    return found


@pytest.mark.slow  # ~60 s: three tracker libraries start in a fresh process
def test_offline_tensorboard_mlflow_wandb_hold_the_loss(tiny_model_dir, arithmetic_dir, tmp_path):
    need("tensorboard", "mlflow", "sqlalchemy", "wandb")
    out = tmp_path / "sft"
    args = sft_overrides(tiny_model_dir, arithmetic_dir, out, **{"train.max_steps": 3})
    r = run_cli(
        "sft",
        "recipes/sft_tiny.yaml",
        *args,
        "logging.report_to=[jsonl, tensorboard, mlflow, wandb]",
        "logging.run_name=tracked",
        env={"WANDB_MODE": "offline", "MLFLOW_TRACKING_URI": "", "WANDB_DIR": ""},
    )
    assert r.returncode == 0, r.stderr
    assert "Removed shared tensor" not in r.stderr + r.stdout
    losses = {rec["step"]: rec["loss"] for rec in read_jsonl(out / "metrics.jsonl")}
    assert sorted(losses) == [1, 2, 3]

    # TensorBoard: events under OUTPUT_DIR/tb, float32 of the same numbers
    tb = tensorboard_scalars(out / "tb", "loss")
    assert tb.keys() == losses.keys()
    assert all(tb[s] == pytest.approx(losses[s], rel=1e-6) for s in losses)

    # MLflow: the SQLite store in the output dir, the run named by logging.run_name
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("posttrain")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "tracked"
    history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "loss")}
    assert history == pytest.approx(losses)
    assert run.data.params["optim.lr"] == "0.001"  # the resolved recipe as hyperparameters

    # W&B offline: one run file whose history records hold each loss as JSON text
    (run_file,) = glob.glob(str(out / "wandb" / "offline-run-*" / "run-*.wandb"))
    data = Path(run_file).read_bytes()
    for loss in losses.values():
        assert json.dumps(loss).encode() in data


def test_grpo_writes_samples_with_their_rewards(
    tiny_model_dir, arithmetic_dir, tmp_path, monkeypatch
):
    need("tensorboard")
    # the random tiny model writes no digits: a length reward gives rewards that differ
    (tmp_path / "trackers_length_reward.py").write_text(
        "def chars(prompts, completions, **columns):\n"
        "    return [len(c) / 10 for c in completions]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    from posttrain.algorithms.grpo import GRPO, GRPORecipe
    from posttrain.scoring.rewards import BUILTIN_REWARDS
    from posttrain.train.loop import train

    out = tmp_path / "grpo"
    values = {
        "model.name_or_path": tiny_model_dir,
        "data.train_path": arithmetic_dir / "rl_train.jsonl",
        "data.eval_path": "",
        "train.output_dir": out,
        "train.max_steps": 3,
        "train.batch_size": 16,
        "grpo.prompts_per_step": 4,
        "grpo.num_generations": 4,
        "grpo.max_new_tokens": 6,
        "grpo.rewards": "[{name: accuracy}, {name: 'trackers_length_reward:chars', weight: 0.5}]",
        "logging.log_every": 1,
        "logging.progress": False,
        "logging.samples_every": 2,
        "logging.samples_count": 5,
        "logging.report_to": "[tensorboard]",
    }
    cfg = load_recipe(
        GRPORecipe, REPO / "recipes/grpo_tiny.yaml", [f"{k}={v}" for k, v in values.items()]
    )
    train(cfg, GRPO(cfg))

    rows = read_jsonl(out / "samples.jsonl")
    # the first rollout (step 1), then the first at least 2 steps later (step 3)
    assert [r["step"] for r in rows] == [1] * 5 + [3] * 5
    answers = {
        row["prompt"][-1]["content"]: row["answer"]
        for row in read_jsonl(arithmetic_dir / "rl_train.jsonl")
    }
    for row in rows:
        answer = [answers[row["prompt"]]]
        acc = BUILTIN_REWARDS["accuracy"]([row["prompt"]], [row["completion"]], answer=answer)[0]
        chars = len(row["completion"]) / 10
        assert row["reward/accuracy"] == acc
        assert row["reward/trackers_length_reward:chars"] == pytest.approx(chars)
        assert row["reward"] == pytest.approx(acc + 0.5 * chars)
        assert row["length"] >= 1 and isinstance(row["truncated"], bool)
    assert any(r["reward"] > 0 for r in rows), "all rewards 0: the check above proves nothing"

    # metrics reach the tracker through accelerator.log (float32 in TensorBoard)
    logged = {r["step"]: r["loss"] for r in read_jsonl(out / "metrics.jsonl")}
    tb = tensorboard_scalars(out / "tb", "loss")
    assert tb.keys() == logged.keys() == {1, 2, 3}
    assert all(tb[s] == pytest.approx(logged[s], rel=1e-6, abs=1e-9) for s in logged)

    # the same table as TensorBoard text at those steps
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    texts = {}
    for events in (out / "tb").rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events), size_guidance={"tensors": 0})
        acc.Reload()
        if "samples/text_summary" in acc.Tags()["tensors"]:
            for event in acc.Tensors("samples/text_summary"):
                texts[event.step] = event.tensor_proto.string_val[0].decode()
    assert texts.keys() == {1, 3}
    assert "| prompt | completion | reward |" in texts[1] and rows[0]["prompt"] in texts[1]


def test_missing_tracker_extra_is_one_line_before_the_model_loads(tmp_path):
    missing = [
        name
        for name, (modules, _) in TRACKER_PACKAGES.items()
        if any(importlib.util.find_spec(m) is None for m in modules)
    ]
    if not missing:
        pytest.skip("every tracker package is installed")
    name = missing[0]
    from typer.testing import CliRunner

    from posttrain.cli import app

    r = CliRunner().invoke(
        app,
        [
            "sft",
            str(REPO / "recipes/sft_tiny.yaml"),
            "model.name_or_path=/nonexistent/model",  # never reached: the check comes first
            f"train.output_dir={tmp_path / 'o'}",
            f"logging.report_to=[jsonl, {name}]",
        ],
        env={"MLFLOW_TRACKING_URI": ""},
    )
    assert r.exit_code == 2, r.stderr
    assert "Traceback" not in r.stderr
    (line,) = [x for x in r.stderr.splitlines() if x.startswith("error:")]
    assert f"logging.report_to includes {name}" in line
    assert f"pip install 'posttrain[{name}]'" in line


def test_report_to_names_and_the_older_tensorboard_key():
    assert requested_trackers(LoggingConfig()) == []
    assert requested_trackers(LoggingConfig(tensorboard=True)) == ["tensorboard"]
    both = LoggingConfig(report_to=["jsonl", "tensorboard"], tensorboard=True)
    assert requested_trackers(both) == ["tensorboard"]
    if importlib.util.find_spec("tensorboard") is None:
        with pytest.raises(Exception, match=r"logging.tensorboard=true .*posttrain\[tensorboard\]"):
            check_trackers(LoggingConfig(tensorboard=True))


def test_resume_keeps_samples_up_to_the_checkpoint(tmp_path):
    from posttrain.train.logging import MetricsLogger

    samples = tmp_path / "samples.jsonl"
    samples.write_text("".join(json.dumps({"step": s, "reward": s}) + "\n" for s in range(1, 6)))
    MetricsLogger(tmp_path, True, resume_step=3).close()
    assert [r["step"] for r in read_jsonl(samples)] == [1, 2, 3]
    assert [r["step"] for r in read_jsonl(tmp_path / "samples.dropped.jsonl")] == [4, 5]
    logger = MetricsLogger(tmp_path, True)  # a fresh run starts a fresh table
    assert not samples.exists()
    logger.log_samples(7, [{"prompt": "p", "completion": "c", "reward": 1.0}])
    logger.close()
    assert read_jsonl(samples) == [{"step": 7, "prompt": "p", "completion": "c", "reward": 1.0}]


QUIET_SCRIPT = """
import warnings
from accelerate import PartialState
from accelerate.utils.other import clean_state_dict_for_safetensors
import torch
from posttrain.train.logging import quiet_library_noise

quiet_library_noise()
PartialState()
tied = torch.zeros(2)
clean_state_dict_for_safetensors({"embed.weight": tied, "lm_head.weight": tied})
warnings.warn("this API will change", FutureWarning)
warnings.warn("a real problem", UserWarning)
"""


@pytest.mark.parametrize("debug", ["", "1"])
def test_library_notices_go_to_the_debug_log(debug):
    r = subprocess.run(
        [sys.executable, "-c", QUIET_SCRIPT],
        capture_output=True,
        text=True,
        env={**os.environ, "POSTTRAIN_DEBUG": debug},
        cwd=REPO,
    )
    assert r.returncode == 0, r.stderr
    assert "a real problem" in r.stderr  # other warnings still show
    shown = ("Removed shared tensor" in r.stderr, "this API will change" in r.stderr)
    assert shown == ((True, True) if debug else (False, False)), r.stderr
