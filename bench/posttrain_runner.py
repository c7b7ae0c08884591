"""One posttrain training run for the benchmark: the real CLI in its own process.

    python -m bench.positions posttrain sft|dpo|rm|grpo bench/work/recipes/CASE.yaml key=value

(`bench.positions` only adds a hook that counts the token positions the model computes, for the
hardware MFU, and the gate that pauses the run between pairs (bench/gate.py), then runs
`python -m posttrain` unchanged.)

The harness writes a recipe per case (below), overrides the side's configuration
(`data.packing`, `train.mixed_precision`) on the command line, and reads the per-step
`step_time` and `tokens` of `OUTPUT_DIR/metrics.jsonl` (`logging.log_every=1`). Settings mirror
bench/trl_runner.py: same examples per step (batch_size, grad_accum=1), max length, learning
rate (constant, no warm-up), weight decay 0, clipping at 1.0, steps and seed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

# GRPO case defaults: samples per prompt and new tokens per sample (a Case may set others;
# bench/trl_runner.py gets the same numbers).
GRPO_GENERATIONS = 8
GRPO_NEW_TOKENS = 32

# CLI command per benchmark case.
COMMANDS = {"sft": "sft", "dpo": "dpo", "rm": "rm", "grpo": "grpo"}


def write_recipe(
    case: str,
    model: Path,
    data: Path,
    path: Path,
    *,
    batch: int,
    lr: float,
    max_length: int,
    threads: int,
    seed: int = 0,
    generations: int = GRPO_GENERATIONS,
    new_tokens: int = GRPO_NEW_TOKENS,
) -> Path:
    """The recipe both sides' settings are read from; output_dir and steps come per run."""
    recipe = {
        "model": {"name_or_path": str(model)},
        "data": {"train_path": str(data), "max_length": max_length, "packing": False},
        "optim": {
            "lr": lr,
            "weight_decay": 0.0,
            "scheduler": "constant",
            "warmup_steps": 0,
            "max_grad_norm": 1.0,
        },
        "train": {
            "seed": seed,
            "batch_size": batch,
            "grad_accum": 1,
            "mixed_precision": "no",
            "save_every": 0,
            "num_threads": threads,
        },
        "logging": {"log_every": 1, "progress": False, "tensorboard": False},
    }
    if case == "sft":
        recipe["data"]["format"] = "prompt_completion"
    elif case == "dpo":
        # The reference forward stays inside each step, as on the TRL side.
        recipe["dpo"] = {"loss_type": "sigmoid", "beta": 0.1, "precompute_ref_logps": False}
    elif case == "rm":
        recipe["rm"] = {"use_margin": False, "centering_coef": 0.0}
    elif case == "grpo":
        # `batch` prompts x GRPO_GENERATIONS samples, one optimisation pass, no KL term; every
        # completion in one micro-batch, as TRL's per_device_train_batch_size does.
        recipe["grpo"] = {
            "loss_type": "grpo",
            "num_generations": generations,
            "prompts_per_step": batch,
            "max_new_tokens": new_tokens,
            "temperature": 1.0,
            "beta": 0.0,
            "num_iterations": 1,
            "rewards": [{"name": "digit_overlap", "weight": 1.0}],
        }
        recipe["train"]["batch_size"] = batch * generations
        recipe["data"]["max_length"] = max_length + new_tokens  # prompt + completion
        recipe["data"]["train_path"] = str(in_sampler_order(data, seed, path.parent))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def in_sampler_order(data: Path, seed: int, out_dir: Path) -> Path:
    """A copy of `data` permuted so that posttrain's StepSampler (seed `seed`) draws the rows in
    file order: row i of the original sits where the sampler's permutation puts position i. TRL
    reads the original without shuffling, so both sides train on the same prompts per step."""
    from posttrain.algorithms.base import StepSampler

    rows = [line for line in Path(data).read_text().splitlines() if line.strip()]
    order = StepSampler(len(rows), seed).global_batch(0, len(rows))  # epoch 0's permutation
    permuted = [""] * len(rows)
    for position, index in enumerate(order):
        permuted[index] = rows[position]
    out = out_dir / f"{Path(data).stem}.sampler_order.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(r + "\n" for r in permuted))
    return out


def command(case: str, recipe: Path, output_dir: Path, steps: int, config: dict) -> list[str]:
    """argv for one run; `config` holds dotted overrides such as {'data.packing': True}, and
    `micro_batch` (the rest of the step's examples come from train.grad_accum)."""
    overrides = [f"train.output_dir={output_dir}", f"train.max_steps={steps}"]
    overrides += [f"{key}={json.dumps(value)}" for key, value in config.items()]
    return [sys.executable, "-m", "bench.positions", "posttrain", COMMANDS[case], str(recipe),
            *overrides]  # fmt: skip


def read_result(output_dir: Path, gate_waits: Path) -> dict:
    """Per-step times (less the time spent at the harness's gate, `gate_waits`), tokens and
    losses from metrics.jsonl (one line per step)."""
    from bench.gate import subtract_waits

    rows = [
        json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines() if line
    ]
    return {
        "side": "posttrain",
        "step_times": subtract_waits([r["step_time"] for r in rows], gate_waits),
        "step_tokens": [int(r["tokens"]) for r in rows],
        # GRPO: the mean completion length of the step's rollout (times the rows: generated tokens)
        "completion_length": [r.get("completion_length") for r in rows],
        "losses": [r["loss"] for r in rows],
    }
