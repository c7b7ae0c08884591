"""`posttrain demo` / `make demo`: the main job on the embedded default.

Creates the tiny model and the bundled arithmetic task locally, measures held-out greedy
accuracy, trains each requested stage with the recipe from `recipes/`, measures again, and
prints a before/after table. `DIR/demo_summary.json` holds one record per stage with `stage`,
`accuracy_before`, `accuracy_after` and `seconds`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

from rich.console import Console
from rich.table import Table

from posttrain.config import ConfigError, load_recipe

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"
EVAL_MAX_NEW_TOKENS = 8


def recipe_path(name: str) -> Path:
    path = RECIPES_DIR / name
    if not path.is_file():
        raise ConfigError(f"demo recipe not found: {path} (run the demo from a posttrain checkout)")
    return path


class DemoContext:
    def __init__(self, out: Path, threads: int, console: Console):
        self.out = out
        self.threads = threads
        self.console = console
        self.base_model = out / "tiny-init"
        self.data = out / "data"
        self.records: list[dict] = []

    def accuracy(self, model_dir: Path) -> dict:
        from posttrain.evaluation import evaluate_model

        return evaluate_model(str(model_dir), str(self.data / "rl_test.jsonl"), EVAL_MAX_NEW_TOKENS)

    def overrides(self, stage_out: Path, model: Path) -> list[str]:
        return [
            f"model.name_or_path={model}",
            f"data.train_path={self.data / 'sft_train.jsonl'}",
            f"data.eval_path={self.data / 'sft_test.jsonl'}",
            f"train.output_dir={stage_out}",
            f"train.num_threads={self.threads}",
            "logging.progress=true",
        ]


def stage_sft(ctx: DemoContext) -> dict:
    from posttrain.algorithms.sft import SFT, SFTRecipe
    from posttrain.train.loop import train

    before = ctx.accuracy(ctx.base_model)
    started = time.perf_counter()
    cfg = load_recipe(SFTRecipe, recipe_path("sft_tiny.yaml"),
                      ctx.overrides(ctx.out / "sft", ctx.base_model) + ["train.save_every=0"])
    result = train(cfg, SFT(cfg))
    train_seconds = time.perf_counter() - started
    after = ctx.accuracy(result.final_dir)
    return {
        "stage": "sft",
        "accuracy_before": before["accuracy"],
        "accuracy_after": after["accuracy"],
        "loss_after": result.last_metrics.get("eval/loss"),
        "train_seconds": train_seconds,
        "model": str(result.final_dir),
    }


STAGES: dict[str, Callable[[DemoContext], dict]] = {"sft": stage_sft}


def run_demo(out: Path, stages: list[str], threads: int = 0) -> list[dict]:
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ConfigError(f"unknown demo stage(s) {unknown}: available {list(STAGES)}")
    from posttrain.data.arithmetic import make_arithmetic
    from posttrain.models.presets import init_model

    console = Console()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ctx = DemoContext(out, threads, console)
    demo_started = time.perf_counter()
    console.print(f"[bold]posttrain demo[/bold] -> {out}  stages: {', '.join(stages)}")
    init_model(ctx.base_model, "tiny")
    make_arithmetic(ctx.data)
    for name in stages:
        started = time.perf_counter()
        console.rule(f"stage {name}")
        record = STAGES[name](ctx)
        record["seconds"] = time.perf_counter() - started
        ctx.records.append(record)
        (out / "demo_summary.json").write_text(json.dumps(ctx.records, indent=1))

    table = Table(title=f"posttrain demo: held-out greedy exact match ({time.perf_counter() - demo_started:.0f} s total)")
    for column in ("stage", "accuracy before", "accuracy after", "eval loss after", "seconds"):
        table.add_column(column, justify="right")
    for r in ctx.records:
        loss = r.get("loss_after")
        table.add_row(r["stage"], f"{r['accuracy_before']:.1%}", f"{r['accuracy_after']:.1%}",
                      "-" if loss is None else f"{loss:.4f}", f"{r['seconds']:.0f}")
    console.print(table)
    console.print(f"summary: {out / 'demo_summary.json'}")
    return ctx.records
