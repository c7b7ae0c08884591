"""`posttrain plot`: curves of two real tiny SFT runs overlaid, checked through the figure."""

from __future__ import annotations

import importlib.util
import json

import pytest
from cli_helpers import REPO, run_cli, sft_overrides

from posttrain.algorithms.sft import SFT, SFTRecipe
from posttrain.config import load_recipe

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("matplotlib") is None, reason="needs the plot extra (matplotlib)"
)


@pytest.fixture(scope="module")
def two_runs(tiny_model_dir, arithmetic_dir, tmp_path_factory):
    """Two 4-step SFT runs with different learning rates, evaluated at steps 2 and 4."""
    from posttrain.train.loop import train

    root = tmp_path_factory.mktemp("plot")
    runs = []
    for name, lr in (("lr-1e-3", 1e-3), ("lr-1e-2", 1e-2)):
        out = root / name
        overrides = sft_overrides(
            tiny_model_dir,
            arithmetic_dir,
            out,
            **{
                "optim.lr": lr,
                "data.eval_path": arithmetic_dir / "sft_test.jsonl",
                "data.max_eval_examples": 16,
                "train.eval_every": 2,
            },
        )
        cfg = load_recipe(SFTRecipe, REPO / "recipes/sft_tiny.yaml", overrides)
        train(cfg, SFT(cfg))
        runs.append(out)
    return runs


def losses(run_dir, key="loss") -> tuple[list[int], list[float]]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [(r["step"], r[key]) for r in records if r.get(key) is not None]
    return [s for s, _ in rows], [v for _, v in rows]


def test_figure_overlays_the_runs_and_marks_eval_points(two_runs):
    from posttrain.plot import build_figure

    fig = build_figure(two_runs, ["loss", "lr"])
    loss_ax, lr_ax = fig.axes[:2]
    assert loss_ax.get_title() == "loss" and lr_ax.get_title() == "lr"
    solid = [line for line in loss_ax.get_lines() if line.get_linestyle() == "-"]
    evals = [line for line in loss_ax.get_lines() if line.get_marker() == "o"]
    assert [line.get_label() for line in solid] == ["lr-1e-3", "lr-1e-2"]  # one line per run
    assert [line.get_label() for line in evals] == ["lr-1e-3 (eval)", "lr-1e-2 (eval)"]
    for run, line, eval_line in zip(two_runs, solid, evals):
        steps, values = losses(run)
        assert list(line.get_xdata()) == steps == [1, 2, 3, 4]
        assert list(line.get_ydata()) == pytest.approx(values)
        eval_steps, eval_values = losses(run, "eval/loss")
        assert list(eval_line.get_xdata()) == eval_steps == [2, 4]
        assert list(eval_line.get_ydata()) == pytest.approx(eval_values)
    assert len(lr_ax.get_lines()) == 2  # no eval/lr: the runs' lines only
    # the two runs differ, so a plot of the same run twice would fail the check above
    assert losses(two_runs[0])[1] != losses(two_runs[1])[1]


def test_plot_command_writes_a_png(two_runs, tmp_path):
    out = tmp_path / "curves.png"
    r = run_cli("plot", *map(str, two_runs), "--metrics", "loss,token_accuracy", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"plot": str(out)}
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


def test_plot_errors_are_one_line(two_runs, tmp_path):
    r = run_cli(
        "plot", str(two_runs[0]), "--metrics", "rewards/mean", "--out", str(tmp_path / "x.png")
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "no run logged rewards/mean" in r.stderr
    r = run_cli("plot", str(tmp_path), "--out", str(tmp_path / "x.png"))
    assert r.returncode == 2 and "no metrics.jsonl" in r.stderr


def test_demo_writes_curves_of_its_runs(two_runs, tmp_path):
    from rich.console import Console

    from posttrain.demo import DemoContext, write_curves

    ctx = DemoContext(tmp_path, 0, Console())
    ctx.run_dirs = list(two_runs)  # what train_stage records for every stage it trains
    assert write_curves(ctx) == tmp_path / "curves.png"
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
