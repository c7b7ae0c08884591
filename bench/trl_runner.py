"""One TRL training run for the benchmark, in its own process; writes per-step timings as JSON.

    python bench/trl_runner.py sft|dpo|rm|grpo --model DIR --data FILE --out RESULT.json \
        --batch 32 --steps 10 --lr 1e-4 --max-length 128 [--bf16] [--padding-free] [--packing]
        [--micro-batch 8] [--threads 2]

Settings mirror the posttrain side (bench/posttrain_runner.py): same examples per optimizer
step (`--batch` = per_device_train_batch_size x gradient_accumulation_steps, split by
`--micro-batch`), max length, learning rate (constant schedule, no warm-up), weight decay 0,
clipping at 1.0, number of steps, seed, logging every step. TRL's activation checkpointing
(on by default in TRL) is switched off through its current name `activation_checkpointing`
(`gradient_checkpointing` is the deprecated alias in transformers 5); posttrain does not
recompute either. Precision (`--bf16`), padding-free and packing are candidates the harness
probes. The record carries the settings read back from `trainer.args` after construction
(`effective`), not the flags asked for.

Tokens per step are counted where TRL builds its batches (the data collator): the non-pad
tokens of every sequence. Step time is the wall time between consecutive `on_step_end` calls
(the first one from `on_train_begin`; a wait at the harness's gate between pairs excluded), so
data loading, forward, backward, clipping, the optimizer and TRL's own per-step metrics are all
inside it, as on the posttrain side.
Argument names are those of TRL 1.16 (trl/trainer/{sft,dpo,reward}_config.py).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path


class CountingCollator:
    """Wraps TRL's collator and records the non-pad tokens of every batch it builds, in order."""

    def __init__(self, inner):
        self.inner = inner
        self.tokens: list[int] = []

    def __call__(self, examples):
        batch = self.inner(examples)
        if isinstance(batch, list):  # GRPO: raw rows; tokens come from the completion lengths
            return batch
        mask = batch.get("attention_mask")
        # Padding-free SFT batches are one (1, total) row of real tokens and carry no mask.
        self.tokens.append(int(mask.sum()) if mask is not None else int(batch["input_ids"].numel()))
        return batch


def command(case: str, model: Path, data: Path, out: Path, config: dict, **options) -> list[str]:
    """argv for one run; `options` are the flags below (batch, steps, lr, max_length, threads,
    device), `config` the side's configuration ({'bf16': True, 'padding_free': False})."""
    argv = [sys.executable, str(Path(__file__).resolve()), case, "--model", str(model)]
    argv += ["--data", str(data), "--out", str(out)]
    for key, value in options.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    for key, value in config.items():
        flag = f"--{key.replace('_', '-')}"
        if value is True:
            argv.append(flag)
        elif value is not False:  # micro_batch
            argv += [flag, str(value)]
    return argv


def build_sft(args, common: dict, train, tokenizer):
    import trl

    # Padding-free TRL does not truncate (it refuses a max_length); the fixtures guarantee that
    # every row fits in max_length, so both settings train the same tokens.
    # Packing ("bfd") packs rows into max_length rows, so a step holds `--batch` packed rows
    # rather than `--batch` examples; the metric (trained tokens/s) stays comparable.
    config = trl.SFTConfig(
        **common,
        max_length=None if args.padding_free and not args.packing else args.max_length,
        padding_free=args.padding_free,
        packing=args.packing,
        completion_only_loss=True,
    )
    return trl.SFTTrainer(args.model, args=config, train_dataset=train, processing_class=tokenizer)


def build_dpo(args, common: dict, train, tokenizer):
    import trl

    # The reference forward stays in every step (precompute_ref_log_probs=False), as on the
    # posttrain side.
    config = trl.DPOConfig(**common, max_length=args.max_length, beta=0.1, loss_type=["sigmoid"])
    return trl.DPOTrainer(args.model, args=config, train_dataset=train, processing_class=tokenizer)


def build_rm(args, common: dict, train, tokenizer):
    import trl

    config = trl.RewardConfig(**common, max_length=args.max_length, center_rewards_coefficient=None)
    return trl.RewardTrainer(
        args.model, args=config, train_dataset=train, processing_class=tokenizer
    )


def digit_overlap_reward(prompts, completions, answer, **kwargs) -> list[float]:
    """posttrain's `digit_overlap` built-in on TRL's conversational completions, so both sides
    optimise the same reward (one with spread inside each group, so the backward does work)."""
    from posttrain.scoring.rewards import digit_overlap

    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    if os.environ.get("BENCH_PROMPTS_LOG"):  # which prompts each step trains on (one line each)
        with open(os.environ["BENCH_PROMPTS_LOG"], "a") as f:
            f.write(json.dumps(sorted({p[-1]["content"] for p in prompts})) + "\n")
    return digit_overlap(prompts, texts, answer=answer)


def build_grpo(args, common: dict, train, tokenizer):
    import trl

    # `--batch` is prompts per step: TRL counts completions per device batch, so 8 prompts x 8
    # samples is per_device_train_batch_size=64 with one generation per optimizer step, one
    # optimisation pass (num_iterations=1) and no reference model (beta=0), as on posttrain.
    # Prompts in file order (shuffle_dataset=False): the posttrain side reads a copy of the file
    # permuted so that its sampler yields the same order (bench/posttrain_runner.py).
    common = dict(common, per_device_train_batch_size=args.batch * args.generations)
    common["gradient_accumulation_steps"] = 1
    config = trl.GRPOConfig(
        **common,
        num_generations=args.generations,
        max_completion_length=args.new_tokens,
        shuffle_dataset=False,
        steps_per_generation=1,
        num_iterations=1,
        beta=0.0,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        loss_type="grpo",
        scale_rewards="group",
        log_completions=False,
    )
    return trl.GRPOTrainer(
        args.model,
        reward_funcs=digit_overlap_reward,
        args=config,
        train_dataset=train,
        processing_class=tokenizer,
    )


# One builder per benchmark case.
TRAINERS = {"sft": build_sft, "dpo": build_dpo, "rm": build_rm, "grpo": build_grpo}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("case", choices=sorted(TRAINERS))
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument(
        "--batch",
        type=int,
        default=32,
        help="sequences (sft), pairs (dpo, rm) or prompts (grpo) per step",
    )
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--padding-free", action="store_true", help="SFT only: flatten each batch")
    p.add_argument("--packing", action="store_true", help="SFT only: bfd packing")
    p.add_argument("--micro-batch", type=int, default=0, help="per-device batch (0: --batch)")
    p.add_argument("--generations", type=int, default=8, help="GRPO samples per prompt")
    p.add_argument("--new-tokens", type=int, default=32, help="GRPO max new tokens")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


EFFECTIVE = (
    "activation_checkpointing", "gradient_checkpointing", "bf16", "fp16",
    "per_device_train_batch_size", "gradient_accumulation_steps", "padding_free", "packing",
    "packing_strategy", "max_length", "loss_type", "num_generations", "max_completion_length",
    "importance_sampling_level", "beta", "shuffle_dataset", "steps_per_generation",
    "num_iterations", "scale_rewards",
)  # fmt: skip


def effective_settings(trainer) -> dict:
    """What the trainer will really do, read back from `trainer.args` and the trainer itself."""
    out = {k: getattr(trainer.args, k) for k in EFFECTIVE if hasattr(trainer.args, k)}
    out = {k: v if isinstance(v, (bool, int, float, str, type(None))) else str(v)
           for k, v in out.items()}  # fmt: skip
    if hasattr(trainer, "padding_free"):  # DPO 1.16 turns a requested padding_free off
        out["padding_free_in_use"] = bool(trainer.padding_free)
    model = trainer.model
    out["model_dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")
    out["model_checkpointing"] = bool(getattr(model, "is_gradient_checkpointing", False))
    out["attn_implementation"] = getattr(model.config, "_attn_implementation", None)
    out["precision"] = "bf16" if out.get("bf16") else "fp16" if out.get("fp16") else "fp32"
    return out


def main() -> None:
    args = parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from bench.gate import Gate
    from bench.positions import install_from_env

    positions = install_from_env()
    gate = Gate.from_env()
    import torch

    torch.set_num_threads(args.threads)
    import datasets
    import transformers
    import trl
    from transformers import AutoTokenizer, TrainerCallback

    transformers.utils.logging.set_verbosity_error()
    datasets.disable_progress_bars()

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []
            self.last = 0.0

        def on_train_begin(self, args, state, control, **kwargs):
            self.last = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if args.device.type == "cuda":
                torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self.last)
            if gate is not None:  # between pairs: wait for the harness (bench/gate.py)
                gate.after_step(len(self.times))
            self.last = time.perf_counter()  # the wait at the gate is not step time

    out_dir = Path(args.out).with_suffix("")
    micro = args.micro_batch or args.batch
    if args.batch % micro:
        raise SystemExit(f"--batch {args.batch} is not a multiple of --micro-batch {micro}")
    common = dict(
        output_dir=str(out_dir),
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=args.batch // micro,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        max_steps=args.steps,
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        dataloader_num_workers=0,
        use_cpu=args.device == "cpu",
        bf16=args.bf16,
        activation_checkpointing=False,
        seed=args.seed,
        disable_tqdm=True,
    )
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    train = datasets.load_dataset("json", data_files=args.data, split="train")
    trainer = TRAINERS[args.case](args, common, train, tokenizer)
    effective = effective_settings(trainer)
    counter = CountingCollator(trainer.data_collator)
    trainer.data_collator = counter
    timer = StepTimer()
    trainer.add_callback(timer)
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    history = [h for h in trainer.state.log_history if "loss" in h]
    losses = [h["loss"] for h in history]
    if args.case == "grpo":
        # Generated tokens per step: the mean completion length TRL logs times the completions.
        rows = args.batch * args.generations
        step_tokens = [round(h["completions/mean_length"] * rows) for h in history]
    else:
        # The loader may build one batch ahead; batch k is still the one trained at step k, and
        # an optimizer step sums its gradient_accumulation_steps micro-batches.
        accum = args.batch // micro
        tokens = counter.tokens
        step_tokens = [sum(tokens[i * accum : (i + 1) * accum]) for i in range(len(timer.times))]
    result = {
        "side": "trl",
        "trl_version": trl.__version__,
        "case": args.case,
        "step_times": timer.times,
        "step_tokens": step_tokens,
        "losses": losses,
        "effective": effective,
        "positions": positions.summary() if positions else None,
        "train_seconds": seconds,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "model", "data")},
    }
    Path(args.out).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
