"""`posttrain demo` / `make demo`: the main job on the embedded default.

Creates the tiny model and the bundled arithmetic task locally, measures held-out greedy
accuracy, trains each requested stage with the recipe from `recipes/`, measures again, and
prints a before/after table. `DIR/demo_summary.json` holds one record per stage with `stage`,
`accuracy_before`, `accuracy_after` and `seconds`; `DIR/curves.png` (with the plot extra) the
training curves of every stage overlaid. Each phase says what it does and how long it took.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

from rich.console import Console
from rich.table import Table

from posttrain.config import ConfigError, load_recipe

# The bundled recipes: inside the installed package (setup.py ships recipes/ as
# posttrain.recipes), or the top-level recipes/ of a checkout (editable install, PYTHONPATH).
RECIPES_DIRS = (
    Path(__file__).resolve().parent / "recipes",
    Path(__file__).resolve().parent.parent / "recipes",
)
EVAL_MAX_NEW_TOKENS = 8


def recipe_path(name: str) -> Path:
    for folder in RECIPES_DIRS:
        if (folder / name).is_file():
            return folder / name
    tried = ", ".join(str(folder) for folder in RECIPES_DIRS)
    raise ConfigError(f"demo recipe {name} not found in {tried} (reinstall posttrain)")


class DemoContext:
    def __init__(self, out: Path, threads: int, console: Console):
        self.out = out
        self.threads = threads
        self.console = console
        self.base_model = out / "tiny-init"
        self.data = out / "data"
        self.records: list[dict] = []
        self.weak: tuple[Path, float] | None = None
        self.reward_model: Path | None = None
        self.run_dirs: list[Path] = []  # every training run, for curves.png

    def accuracy(self, model_dir: Path) -> dict:
        from posttrain.evaluation import evaluate_model

        started = time.perf_counter()
        with self.console.status(f"held-out greedy accuracy of {model_dir} ..."):
            result = evaluate_model(
                str(model_dir), str(self.data / "rl_test.jsonl"), EVAL_MAX_NEW_TOKENS
            )
        self.console.print(
            f"  accuracy of {model_dir}: {result['accuracy']:.1%} "
            f"({time.perf_counter() - started:.0f} s)"
        )
        return result

    def overrides(self, stage_out: Path, model: Path, recipe: Path) -> list[str]:
        """Point a recipe at this demo's model, output and data files (same file names)."""
        from posttrain.config import read_yaml

        data = read_yaml(recipe).get("data", {})
        moved = [
            f"data.{key}={self.data / Path(data[key]).name}"
            for key in ("train_path", "eval_path")
            if data.get(key)
        ]
        return [
            f"model.name_or_path={model}",
            f"train.output_dir={stage_out}",
            f"train.num_threads={self.threads}",
            "logging.progress=true",
            *moved,
        ]


def train_stage(
    ctx: DemoContext, algorithm: str, recipe: str, model: Path, out_name: str, extra: list[str] = ()
) -> tuple:
    """Train `algorithm` with recipes/`recipe` from `model`; returns (result, seconds)."""
    from posttrain.algorithms import ALGORITHMS
    from posttrain.train.loop import train

    recipe_cls, algorithm_cls = ALGORITHMS[algorithm]
    path = recipe_path(recipe)
    overrides = ctx.overrides(ctx.out / out_name, model, path) + ["train.save_every=0", *extra]
    cfg = load_recipe(recipe_cls, path, overrides)
    ctx.console.print(
        f"  training {algorithm} with recipes/{recipe}: {cfg.train.max_steps} steps "
        f"from {model} -> {cfg.train.output_dir}"
    )
    started = time.perf_counter()
    result = train(cfg, algorithm_cls(cfg))
    seconds = time.perf_counter() - started
    ctx.run_dirs.append(result.output_dir)
    ctx.console.print(f"  {algorithm} done in {seconds:.0f} s")
    return result, seconds


def stage_sft(ctx: DemoContext) -> dict:
    before = ctx.accuracy(ctx.base_model)
    result, seconds = train_stage(ctx, "sft", "sft_tiny.yaml", ctx.base_model, "sft")
    after = ctx.accuracy(result.final_dir)
    return {
        "stage": "sft",
        "accuracy_before": before["accuracy"],
        "accuracy_after": after["accuracy"],
        "loss_after": result.last_metrics.get("eval/loss"),
        "train_seconds": seconds,
        "model": str(result.final_dir),
    }


def weak_sft(ctx: DemoContext) -> tuple[Path, float]:
    """A deliberately under-trained SFT checkpoint (made once per demo) for the later stages."""
    if ctx.weak is None:
        ctx.console.print("[bold]weak SFT[/bold]: the starting point of this stage (made once)")
        result, _ = train_stage(ctx, "sft", "sft_tiny_weak.yaml", ctx.base_model, "sft-weak")
        ctx.weak = (result.final_dir, ctx.accuracy(result.final_dir)["accuracy"])
    return ctx.weak


def pairwise_accuracy(model_dir: Path, pairs_path: Path) -> float:
    """Held-out fraction of pairs whose chosen answer scores above the rejected one."""
    from posttrain.data.loading import load_rows
    from posttrain.scoring.reward_model import RewardModelScorer

    rows = load_rows(pairs_path)
    scorer = RewardModelScorer(str(model_dir))
    chosen = scorer(rows["prompt"], [c[0]["content"] for c in rows["chosen"]])
    rejected = scorer(rows["prompt"], [r[0]["content"] for r in rows["rejected"]])
    return sum(c > r for c, r in zip(chosen, rejected)) / len(chosen)


def stage_rm(ctx: DemoContext) -> dict:
    weak, _ = weak_sft(ctx)
    pairs = ctx.data / "preference_test.jsonl"
    before = pairwise_accuracy(weak, pairs)  # a fresh, untrained score head
    result, seconds = train_stage(ctx, "rm", "rm_tiny.yaml", weak, "rm")
    ctx.reward_model = result.final_dir
    return {
        "stage": "rm",
        "metric": "held-out pairwise accuracy",
        "accuracy_before": before,
        "accuracy_after": pairwise_accuracy(result.final_dir, pairs),
        "train_seconds": seconds,
        "model": str(result.final_dir),
    }


def policy_stage(
    name: str, algorithm: str, recipe: str, extra: Callable[[DemoContext], list[str]] = lambda c: []
) -> Callable[[DemoContext], dict]:
    """A stage that improves the weak SFT checkpoint's greedy accuracy (dpo, grpo, kimi, ppo);
    `extra` gives recipe overrides that depend on earlier stages."""

    def stage(ctx: DemoContext) -> dict:
        weak, before = weak_sft(ctx)
        result, seconds = train_stage(ctx, algorithm, recipe, weak, name, extra(ctx))
        return {
            "stage": name,
            "accuracy_before": before,
            "accuracy_after": ctx.accuracy(result.final_dir)["accuracy"],
            "train_seconds": seconds,
            "model": str(result.final_dir),
        }

    return stage


def stage_tools(ctx: DemoContext) -> dict:
    """Multi-turn tool use (posttrain/envs): a weak tool-use SFT on the multiplication task,
    then GRPO in the `tools` environment with the calculator; held-out greedy exact match of
    the whole conversation's last turn, measured as the recipe runs it (same turns, budget)."""
    from posttrain.config import read_yaml
    from posttrain.data.tools import make_tools
    from posttrain.envs.rollouts import evaluate_in_environment

    make_tools(ctx.data)
    recipe = read_yaml(recipe_path("grpo_tiny_tools.yaml"))["grpo"]

    def accuracy(model_dir: Path) -> float:
        return evaluate_in_environment(
            str(model_dir),
            str(ctx.data / "tools_rl_test.jsonl"),
            recipe["environment"],
            recipe["tools"],
            recipe["max_new_tokens"],
            recipe["max_turns"],
        )["accuracy"]

    weak, sft_seconds = train_stage(
        ctx, "sft", "sft_tiny_tools_weak.yaml", ctx.base_model, "sft-tools-weak"
    )
    before = accuracy(weak.final_dir)
    result, seconds = train_stage(ctx, "grpo", "grpo_tiny_tools.yaml", weak.final_dir, "tools")
    return {
        "stage": "tools",
        "metric": "held-out greedy exact match, multi-turn with the calculator tool",
        "accuracy_before": before,
        "accuracy_after": accuracy(result.final_dir),
        "sft_seconds": sft_seconds,
        "train_seconds": seconds,
        "model": str(result.final_dir),
    }


def scored_by_demo_reward_model(ctx: DemoContext) -> list[str]:
    """PPO's only reward: the reward model the rm stage trained (RLHF end to end)."""
    return [f"ppo.rewards=[{{name: reward_model, params: {{path: {ctx.reward_model}}}}}]"]


STAGES: dict[str, Callable[[DemoContext], dict]] = {
    "sft": stage_sft,
    "rm": stage_rm,
    "dpo": policy_stage("dpo", "dpo", "dpo_tiny.yaml"),
    "grpo": policy_stage("grpo", "grpo", "grpo_tiny.yaml"),
    "gspo": policy_stage("gspo", "grpo", "grpo_tiny_gspo.yaml"),
    "kimi": policy_stage("kimi", "kimi", "kimi_tiny.yaml"),
    "ppo": policy_stage("ppo", "ppo", "ppo_tiny.yaml"),
    "tools": stage_tools,
    # needs stage rm before it
    "ppo_rm": policy_stage("ppo_rm", "ppo", "ppo_tiny_rm.yaml", scored_by_demo_reward_model),
}


def run_demo(out: Path, stages: list[str], threads: int = 0) -> list[dict]:
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ConfigError(f"unknown demo stage(s) {unknown}: available {list(STAGES)}")
    if "ppo_rm" in stages and "rm" not in stages[: stages.index("ppo_rm")]:
        raise ConfigError(
            "demo stage ppo_rm scores with the demo's reward model: list rm before it"
        )
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

    table = Table(
        title=f"posttrain demo: held-out greedy exact match ({time.perf_counter() - demo_started:.0f} s total)"
    )
    for column in ("stage", "accuracy before", "accuracy after", "eval loss after", "seconds"):
        table.add_column(column, justify="right")
    for r in ctx.records:
        loss = r.get("loss_after")
        table.add_row(
            r["stage"],
            f"{r['accuracy_before']:.1%}",
            f"{r['accuracy_after']:.1%}",
            "-" if loss is None else f"{loss:.4f}",
            f"{r['seconds']:.0f}",
        )
    console.print(table)
    console.print(f"summary: {out / 'demo_summary.json'}")
    write_curves(ctx)
    return ctx.records


def write_curves(ctx: DemoContext) -> Path | None:
    """DIR/curves.png: every stage's training curves overlaid (`posttrain plot`), when
    matplotlib (the plot extra) is installed."""
    import importlib.util

    if not ctx.run_dirs:
        return None
    if importlib.util.find_spec("matplotlib") is None:
        ctx.console.print("curves: pip install 'posttrain[plot]' to get curves.png")
        return None
    from posttrain.plot import plot_runs

    path = plot_runs(ctx.run_dirs, ctx.out / "curves.png")
    ctx.console.print(f"curves: {path}")
    return path
