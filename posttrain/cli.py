"""The `posttrain` command line (typer). Every trainer is `posttrain ALGO RECIPE.yaml [key=value ...]`.

Errors in user input (recipes, data, model paths) print one line and exit with status 2;
tracebacks are kept for bugs.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    name="posttrain",
    help="LLM post-training: SFT, reward models, DPO, PPO, GRPO and Kimi k1.5 on one Accelerate loop.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Generate bundled data sets.", no_args_is_help=True)
app.add_typer(data_app, name="data")


def _user_errors() -> tuple[type, ...]:
    from posttrain.config import ConfigError
    from posttrain.data.loading import DataError
    from posttrain.models.loading import ModelError

    return (ConfigError, DataError, ModelError)


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code=2)


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def run_algorithm(name: str, recipe: Path, overrides: list[str], resume: bool) -> dict:
    """Load the recipe for algorithm `name`, train, return the last logged metrics."""
    from posttrain.algorithms import ALGORITHMS
    from posttrain.config import load_recipe
    from posttrain.train.loop import train

    recipe_cls, algorithm_cls = ALGORITHMS[name]
    if resume:
        overrides = [*overrides, "train.resume=true"]
    cfg = load_recipe(recipe_cls, recipe, overrides)
    if not cfg.model.name_or_path:
        from posttrain.config import ConfigError

        raise ConfigError(f"{recipe}: model.name_or_path is required")
    result = train(cfg, algorithm_cls(cfg))
    return {
        "output_dir": str(result.output_dir),
        "final": str(result.final_dir),
        **result.last_metrics,
    }


def _trainer_command(name: str, summary: str):
    def command(
        recipe: Annotated[Path, typer.Argument(help="YAML recipe (see recipes/).")],
        overrides: Annotated[
            list[str] | None, typer.Argument(help="Dotted overrides, e.g. optim.lr=3e-4")
        ] = None,
        resume: Annotated[
            bool, typer.Option("--resume", help="Continue from the latest checkpoint.")
        ] = False,
    ) -> None:
        _quiet_libraries()
        try:
            run_algorithm(name, recipe, overrides or [], resume)
        except _user_errors() as e:
            _fail(str(e))

    command.__doc__ = summary
    app.command(name, help=summary)(command)


_trainer_command("sft", "Supervised fine-tuning on chats, prompt/completion pairs or text.")
_trainer_command("rm", "Train a scalar reward model (Bradley-Terry) on preference pairs.")
_trainer_command("dpo", "Preference optimisation: DPO, cDPO, robust, hinge, IPO, SimPO, ORPO.")
_trainer_command("kto", "KTO on unpaired desirable / undesirable completions.")
_trainer_command(
    "grpo",
    "Online RL: GRPO, Dr. GRPO, DAPO, GSPO, CISPO; RLOO or REINFORCE++ advantages (or Kimi).",
)
_trainer_command(
    "kimi", "Kimi k1.5 policy optimisation (online mirror descent, length penalty, curriculum)."
)
_trainer_command(
    "ppo", "PPO actor-critic RLHF: a value-head critic, GAE, clipped losses, KL-penalised reward."
)


@app.command("init-model")
def init_model_cmd(
    out: Annotated[Path, typer.Argument(help="Directory to write the checkpoint to.")],
    preset: Annotated[str, typer.Option(help="tiny (~1M parameters) or small (~28M).")] = "tiny",
    arch: Annotated[str, typer.Option(help="llama, qwen3, qwen3_moe or mixtral.")] = "llama",
    seed: Annotated[int, typer.Option(help="Initialisation seed.")] = 0,
) -> None:
    """Create a randomly initialised Hugging Face checkpoint with a local tokenizer."""
    _quiet_libraries()
    from posttrain.models.presets import count_parameters, init_model

    try:
        path = init_model(out, preset, arch, seed)
    except ValueError as e:
        _fail(str(e))
    from transformers import AutoModelForCausalLM

    n = count_parameters(AutoModelForCausalLM.from_pretrained(path))
    typer.echo(json.dumps({"path": str(path), "preset": preset, "arch": arch, "parameters": n}))


@data_app.command("arithmetic")
def data_arithmetic_cmd(
    out_dir: Annotated[Path, typer.Argument(help="Directory for the JSONL files.")],
    n: Annotated[int, typer.Option(help="Training rows.")] = 6000,
    n_test: Annotated[int, typer.Option(help="Held-out problems.")] = 500,
    seed: Annotated[int, typer.Option(help="Seed for the split and the rows.")] = 0,
) -> None:
    """Write the bundled 2-digit addition task (SFT, prompt/completion, preference, RL rows)."""
    from posttrain.data.arithmetic import make_arithmetic

    try:
        counts = make_arithmetic(out_dir, n=n, n_test=n_test, seed=seed)
    except ValueError as e:
        _fail(str(e))
    typer.echo(json.dumps({"out_dir": str(out_dir), "files": counts}))


@app.command("eval")
def eval_cmd(
    model_dir: Annotated[str, typer.Argument(help="Model directory (e.g. OUTPUT_DIR/final).")],
    data: Annotated[
        str, typer.Argument(help="Rows with 'prompt' and 'answer' (e.g. rl_test.jsonl).")
    ],
    max_new_tokens: Annotated[int, typer.Option(help="Generation budget per answer.")] = 16,
    samples: Annotated[
        int, typer.Option(help="K>1 adds pass@K with K samples at temperature 1.")
    ] = 1,
    limit: Annotated[int | None, typer.Option(help="Use only the first N rows.")] = None,
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 0,
    trust_remote_code: Annotated[
        bool, typer.Option(help="Allow model code from the checkpoint.")
    ] = False,
) -> None:
    """Greedy exact-match accuracy (and pass@K) on prompt/answer rows; prints one JSON object."""
    _quiet_libraries()
    from posttrain.evaluation import evaluate_model

    try:
        result = evaluate_model(
            model_dir, data, max_new_tokens, samples, limit, seed, trust_remote_code
        )
    except _user_errors() as e:
        _fail(str(e))
    typer.echo(json.dumps(result))


@app.command("merge")
def merge_cmd(
    adapter_dir: Annotated[
        Path, typer.Argument(help="A LoRA adapter directory written by posttrain.")
    ],
    out: Annotated[Path, typer.Argument(help="Where to write the merged Hugging Face model.")],
) -> None:
    """Merge a LoRA adapter into its base model and save weights plain transformers loads."""
    _quiet_libraries()
    from posttrain.models.merge import merge_adapter

    try:
        merge_adapter(adapter_dir, out)
    except _user_errors() as e:
        _fail(str(e))
    typer.echo(json.dumps({"merged": str(out)}))


@app.command("demo")
def demo_cmd(
    out: Annotated[Path, typer.Option(help="Working directory for the demo.")] = Path("demo_out"),
    stages: Annotated[
        str, typer.Option(help="Comma-separated, from sft, rm, dpo, grpo, kimi, ppo, ppo_rm.")
    ] = "sft,grpo",
    threads: Annotated[int, typer.Option(help="torch threads (0: all cores).")] = 0,
) -> None:
    """Run the main job on the embedded default: tiny model, bundled task, before/after table."""
    _quiet_libraries()
    from posttrain.demo import run_demo

    try:
        run_demo(out, [s.strip() for s in stages.split(",") if s.strip()], threads)
    except _user_errors() as e:
        _fail(str(e))


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
