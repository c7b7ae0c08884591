"""The `posttrain` command line (typer). Every trainer is `posttrain ALGO RECIPE.yaml [key=value ...]`.

The trainer commands are generated from the algorithm registry (posttrain.algorithms.ALGORITHMS).
Errors in user input (recipes, data, model paths, reward code, the output directory) print one
line and exit with status 2; tracebacks are kept for bugs, and shown for everything with
POSTTRAIN_DEBUG=1 (see posttrain/errors.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from typer.core import TyperGroup


class _RegistryGroup(TyperGroup):
    """The top-level command group. The trainer commands come from the algorithm registry, which
    imports torch and transformers (seconds), so they are added only when a command is looked up
    that is not one of the light ones, or when the commands are listed (`--help`)."""

    def _add_trainers(self) -> None:
        if getattr(self, "_trainers_added", False):
            return
        self._trainers_added = True
        # Shell completion asks for the command names on every TAB: answer from the static
        # list, without importing the registry (torch, seconds).
        completing = (
            f"_{(self.name or 'posttrain').upper().replace('-', '_')}_COMPLETE" in os.environ
        )
        trainers = typer.main.get_group(_trainer_app(light=completing)).commands
        self.commands = {**trainers, **self.commands}  # trainers first in --help

    def list_commands(self, ctx):
        self._add_trainers()
        return super().list_commands(ctx)

    def get_command(self, ctx, name):
        if name not in self.commands:
            self._add_trainers()
        return super().get_command(ctx, name)


app = typer.Typer(
    cls=_RegistryGroup,
    name="posttrain",
    help="LLM post-training: SFT, reward models, DPO, PPO, GRPO and Kimi k1.5 on one Accelerate loop.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Generate bundled data sets.", no_args_is_help=True)
app.add_typer(data_app, name="data")
config_app = typer.Typer(
    help="Show recipes: every key with its type, default and doc, or a resolved recipe.",
    no_args_is_help=True,
)
app.add_typer(config_app, name="config")


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code=2)


@contextlib.contextmanager
def user_errors_exit(output_dir: str | None = None):
    """The CLI's one error boundary: a foreseeable user error (see posttrain/errors.py) becomes
    one line on stderr and exit status 2; anything else is a bug and keeps its traceback, as
    does everything with POSTTRAIN_DEBUG=1."""
    from posttrain.errors import debug_enabled, user_message

    try:
        yield
    except (typer.Exit, typer.Abort):  # already handled (an inner boundary's one line)
        raise
    except Exception as error:
        message = None if debug_enabled() else user_message(error, output_dir)
        if message is None:
            raise
        _fail(message)


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    from posttrain.train.logging import quiet_library_noise

    quiet_library_noise()


def _import_path_with_cwd() -> None:
    """`module:function` rewards resolve against the working directory, as `python -m` would
    (the console script puts only its own directory on sys.path)."""
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())


def run_algorithm(name: str, recipe: Path, overrides: list[str], resume: bool) -> dict:
    """Train algorithm `name` through the Python API (posttrain/api.py), the one entry both use;
    return the output directories and the last logged metrics."""
    from posttrain.api import trainer_class
    from posttrain.train.distributed import close_process_group

    if resume:
        overrides = [*overrides, "train.resume=true"]
    trainer = trainer_class(name)(recipe, overrides=overrides)
    trainer.prepare()  # recipe, data and environment checks, before the output boundary
    output_dir = trainer.config.train.output_dir
    with user_errors_exit(output_dir):  # write failures name the output directory
        result = trainer.train()
        close_process_group()
    return {
        "output_dir": str(result.output_dir),
        "final": str(result.final_dir),
        **result.last_metrics,
    }


# One-line help per trainer; a registered algorithm without an entry here still gets its command
# (help from its recipe's docstring), so the command list always equals the registry.
TRAINER_HELP = {
    "sft": "Supervised fine-tuning on chats, prompt/completion pairs or text.",
    "rm": "Train a scalar reward model (Bradley-Terry) on preference pairs.",
    "dpo": "Preference optimisation: DPO, cDPO, robust, hinge, IPO, SimPO, ORPO.",
    "kto": "KTO on unpaired desirable / undesirable completions.",
    "grpo": "Online RL: GRPO, Dr. GRPO, DAPO, GSPO, CISPO; RLOO or REINFORCE++ advantages.",
    "kimi": "Kimi k1.5 policy optimisation (online mirror descent, length penalty, curriculum).",
    "ppo": "PPO actor-critic RLHF: a value-head critic, GAE, clipped losses, KL-penalised reward.",
}


def _trainer_command(trainers: typer.Typer, name: str, summary: str, epilog: str = "") -> None:
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
        _import_path_with_cwd()
        with user_errors_exit():
            run_algorithm(name, recipe, overrides or [], resume)

    command.__doc__ = summary
    trainers.command(name, help=summary, epilog=epilog or None)(command)


def _recipe_epilog(name: str, recipe_cls: type) -> str:
    """`posttrain ALGO --help`'s list of recipe sections, and where to see their keys."""
    from posttrain.config_docs import section_docs

    sections = section_docs(recipe_cls)
    width = max(len(section) for section, _ in sections)
    lines = [f"  {section:<{width}}  {doc}" for section, doc in sections]
    # \b: click prints the next paragraph as written (no re-wrapping of the table).
    return (
        "\b\nRecipe sections:\n"
        + "\n".join(lines)
        + "\n\n\b\nEvery key with its type, default and doc:"
        + f"\n  posttrain config keys {name}"
        + "\nThe resolved recipe (defaults, RECIPE, overrides) as commented YAML:"
        + f"\n  posttrain config show {name} [RECIPE] [KEY=VALUE ...]"
    )


def _trainer_app(light: bool = False) -> typer.Typer:
    """One command per registered algorithm, all with the same arguments and behaviour.
    `light`: names and summaries only, without importing the registry (shell completion)."""
    trainers = typer.Typer()
    if light:
        for name, summary in TRAINER_HELP.items():
            _trainer_command(trainers, name, summary)
        return trainers
    from posttrain.algorithms import ALGORITHMS

    for name, (recipe_cls, _) in ALGORITHMS.items():
        doc = (recipe_cls.__doc__ or "").strip().splitlines()
        summary = TRAINER_HELP.get(name) or (doc[0] if doc else f"Train with {name}.")
        _trainer_command(trainers, name, summary, _recipe_epilog(name, recipe_cls))
    return trainers


def _recipe_class(algorithm: str) -> type:
    from posttrain.algorithms import ALGORITHMS

    if algorithm not in ALGORITHMS:
        _fail(f"unknown algorithm {algorithm!r}: expected one of {', '.join(ALGORITHMS)}")
    return ALGORITHMS[algorithm][0]


@config_app.command("show")
def config_show_cmd(
    algorithm: Annotated[str, typer.Argument(help="sft, rm, dpo, kto, grpo, kimi or ppo.")],
    args: Annotated[
        list[str] | None,
        typer.Argument(
            help="An optional recipe YAML, then dotted overrides (e.g. optim.lr=3e-4).",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Print the fully resolved recipe (defaults, recipe file, overrides) as YAML, each key
    preceded by its docstring. The output is itself a valid recipe."""
    from posttrain.api import load_recipe
    from posttrain.config_docs import commented_yaml

    args = list(args or [])
    recipe = args.pop(0) if args and "=" not in args[0] else None
    _recipe_class(algorithm)
    with user_errors_exit():
        cfg = load_recipe(algorithm, recipe, args)
    typer.echo(commented_yaml(cfg), nl=False)


@config_app.command("keys")
def config_keys_cmd(
    algorithm: Annotated[str, typer.Argument(help="sft, rm, dpo, kto, grpo, kimi or ppo.")],
    as_json: Annotated[
        bool, typer.Option("--json", help="One JSON object per key instead of a table.")
    ] = False,
) -> None:
    """Every recipe key of ALGORITHM: dotted key, type, default and doc."""
    from posttrain.config_docs import keys_table, recipe_keys

    recipe_cls = _recipe_class(algorithm)
    if as_json:
        for key in recipe_keys(recipe_cls):
            typer.echo(json.dumps(key.__dict__))
    else:
        typer.echo(keys_table(recipe_cls), nl=False)


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
        with user_errors_exit():  # e.g. OUT is an existing file
            path = init_model(out, preset, arch, seed)
    except ValueError as e:  # a bad preset or architecture name
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
        with user_errors_exit():  # e.g. OUT_DIR is an existing file
            counts = make_arithmetic(out_dir, n=n, n_test=n_test, seed=seed)
    except ValueError as e:
        _fail(str(e))
    typer.echo(json.dumps({"out_dir": str(out_dir), "files": counts}))


@data_app.command("tools")
def data_tools_cmd(
    out_dir: Annotated[Path, typer.Argument(help="Directory for the JSONL files.")],
    n: Annotated[int, typer.Option(help="Training rows.")] = 4000,
    n_test: Annotated[int, typer.Option(help="Held-out problems.")] = 200,
    seed: Annotated[int, typer.Option(help="Seed for the split and the rows.")] = 0,
) -> None:
    """Write the bundled tool-use task: 3-4 digit multiplication with a calculator tool
    (tool-use SFT transcripts and RL prompts, train and held-out)."""
    from posttrain.data.tools import make_tools

    with user_errors_exit():  # e.g. OUT_DIR is an existing file
        counts = make_tools(out_dir, n=n, n_test=n_test, seed=seed)
    typer.echo(json.dumps({"out_dir": str(out_dir), "files": counts}))


def _reward_option(text: str):
    """`--reward NAME` (a built-in or module:function) or a YAML mapping with name, weight and
    params: `--reward "{name: reward_model, params: {path: runs/rm-tiny/final}}"`."""
    import yaml

    from posttrain.config import ConfigError, RewardFunctionConfig, from_dict

    if not text.lstrip().startswith("{"):
        return RewardFunctionConfig(name=text)
    try:
        return from_dict(RewardFunctionConfig, yaml.safe_load(text), "--reward")
    except yaml.YAMLError:
        raise ConfigError(f"--reward {text!r}: not a YAML mapping") from None


@app.command("eval")
def eval_cmd(
    model_dir: Annotated[str, typer.Argument(help="Model directory (e.g. OUTPUT_DIR/final).")],
    data: Annotated[
        str,
        typer.Argument(
            help="Rows with prompt + answer/completion, or messages (any file `data` reads)."
        ),
    ],
    metric: Annotated[
        str | None,
        typer.Option(
            help="exact_match (greedy answer vs reference), reward (mean of --reward), or loss "
            "(mean token NLL on SFT rows). Default: reward with --reward, else exact_match."
        ),
    ] = None,
    reward: Annotated[
        list[str] | None,
        typer.Option(
            help="Reward function, repeatable: a built-in (accuracy, format, ...), module:function, "
            "or a YAML mapping {name: ..., weight: ..., params: {...}}."
        ),
    ] = None,
    match: Annotated[
        str,
        typer.Option(
            help="exact_match rule: answer (final answer: last <answer> tag, else last \\boxed{}, "
            "else last number; numbers compared numerically) or exact (whole completion, "
            "stripped, equals the reference)."
        ),
    ] = "answer",
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Generation budget per answer.")] = 16,
    samples: Annotated[
        int, typer.Option(min=1, help="K>1 adds pass@K with K samples at temperature 1.")
    ] = 1,
    success_threshold: Annotated[
        float, typer.Option(help="reward with K>1: a sample counts for pass@K at reward >= this.")
    ] = 1.0,
    limit: Annotated[int | None, typer.Option(min=1, help="Use only the first N rows.")] = None,
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 0,
    max_length: Annotated[int, typer.Option(min=2, help="loss: tokens per example.")] = 1024,
    batch_size: Annotated[int, typer.Option(min=1, help="loss: examples per forward.")] = 8,
    trust_remote_code: Annotated[
        bool, typer.Option(help="Allow model code from the checkpoint.")
    ] = False,
) -> None:
    """Evaluate a model: exact match, your reward functions, or token loss (and pass@K);
    prints one JSON object."""
    _quiet_libraries()
    _import_path_with_cwd()
    from posttrain.evaluation import evaluate_model

    with user_errors_exit():
        rewards = [_reward_option(r) for r in reward or []]
        result = evaluate_model(
            model_dir,
            data,
            max_new_tokens,
            samples,
            limit,
            seed,
            trust_remote_code,
            metric=metric or ("reward" if rewards else "exact_match"),
            rewards=rewards,
            match=match,
            success_threshold=success_threshold,
            max_length=max_length,
            batch_size=batch_size,
        )
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

    with user_errors_exit():
        merge_adapter(adapter_dir, out)
    typer.echo(json.dumps({"merged": str(out)}))


@app.command("plot")
def plot_cmd(
    run_dirs: Annotated[
        list[Path], typer.Argument(help="Run directories (train.output_dir) with metrics.jsonl.")
    ],
    metrics: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated metrics, e.g. loss,rewards/mean (default: common ones)."
        ),
    ] = None,
    out: Annotated[Path, typer.Option(help="Image to write (.png, .svg, .pdf).")] = Path(
        "curves.png"
    ),
) -> None:
    """Training curves of several runs overlaid: one subplot per metric, eval points marked."""
    from posttrain.plot import plot_runs

    chosen = [m.strip() for m in metrics.split(",") if m.strip()] if metrics else None
    with user_errors_exit():
        path = plot_runs(run_dirs, out, chosen)
    typer.echo(json.dumps({"plot": str(path)}))


@app.command("demo")
def demo_cmd(
    out: Annotated[Path, typer.Option(help="Working directory for the demo.")] = Path("demo_out"),
    stages: Annotated[
        str,
        typer.Option(
            help="Comma-separated, from sft, rm, dpo, grpo, gspo, kimi, ppo, ppo_rm, tools."
        ),
    ] = "sft,grpo",
    threads: Annotated[int, typer.Option(help="torch threads (0: all cores).")] = 0,
) -> None:
    """Run the main job on the embedded default: tiny model, bundled task, before/after table."""
    _quiet_libraries()
    from posttrain.demo import run_demo

    with user_errors_exit():
        run_demo(out, [s.strip() for s in stages.split(",") if s.strip()], threads)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
