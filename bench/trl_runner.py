"""One TRL training run for the benchmark, in its own process; writes per-step timings as JSON.

    python bench/trl_runner.py sft|dpo|rm|grpo --model DIR --data FILE --out RESULT.json \
        --batch 32 --steps 10 --lr 1e-4 --max-length 128 [--bf16] [--padding-free] [--threads 2]

Settings mirror the posttrain side (bench/posttrain_runner.py): same examples per optimizer
step (per_device_train_batch_size, gradient_accumulation_steps=1), max length, learning rate
(constant schedule, no warm-up), weight decay 0, clipping at 1.0, number of steps, seed,
logging every step. Two TRL defaults are changed because they only cost time here:
`gradient_checkpointing` (TRL defaults to True; posttrain does not recompute) and `bf16`
(TRL defaults to True; the harness tries both and keeps the faster).

Tokens per step are counted where TRL builds its batches (the data collator): the non-pad
tokens of every sequence. Step time is the wall time between consecutive `on_step_end` calls
(the first one from `on_train_begin`), so data loading, forward, backward, clipping, the
optimizer and TRL's own per-step metrics are all inside it, as on the posttrain side.
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
        if isinstance(batch, list):  # GRPO: raw rows; tokens exist only after generation
            self.tokens.append(0)
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
    return argv + [f"--{k.replace('_', '-')}" for k, v in config.items() if v is True]


def build_sft(args, common: dict, train, tokenizer):
    import trl

    # Padding-free TRL does not truncate (it refuses a max_length); the fixtures guarantee that
    # every row fits in max_length, so both settings train the same tokens.
    config = trl.SFTConfig(
        **common,
        max_length=None if args.padding_free else args.max_length,
        padding_free=args.padding_free,
        packing=False,
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
    return digit_overlap(prompts, texts, answer=answer)


def build_grpo(args, common: dict, train, tokenizer):
    import trl

    from bench.posttrain_runner import GRPO_GENERATIONS, GRPO_NEW_TOKENS

    # `--batch` is prompts per step: TRL counts completions per device batch, so 8 prompts x 8
    # samples is per_device_train_batch_size=64 with one generation per optimizer step, one
    # optimisation pass (num_iterations=1) and no reference model (beta=0), as on posttrain.
    common = dict(common, per_device_train_batch_size=args.batch * GRPO_GENERATIONS)
    config = trl.GRPOConfig(
        **common,
        num_generations=GRPO_GENERATIONS,
        max_completion_length=GRPO_NEW_TOKENS,
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
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def main() -> None:
    args = parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
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
            now = time.perf_counter()
            self.times.append(now - self.last)
            self.last = now

    out_dir = Path(args.out).with_suffix("")
    common = dict(
        output_dir=str(out_dir),
        per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=1,
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
        gradient_checkpointing=False,
        seed=args.seed,
        disable_tqdm=True,
    )
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    train = datasets.load_dataset("json", data_files=args.data, split="train")
    trainer = TRAINERS[args.case](args, common, train, tokenizer)
    counter = CountingCollator(trainer.data_collator)
    trainer.data_collator = counter
    timer = StepTimer()
    trainer.add_callback(timer)
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    result = {
        "side": "trl",
        "trl_version": trl.__version__,
        "case": args.case,
        "step_times": timer.times,
        # The loader may build one batch ahead; batch k is still the one trained at step k.
        "step_tokens": counter.tokens[: len(timer.times)],
        "losses": losses,
        "train_seconds": seconds,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "model", "data")},
    }
    Path(args.out).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
