"""Self-speculative decoding with MTP heads vs the same RolloutEngine without speculation.

    python bench/speculative_bench.py [--preset small] [--kind medusa] [--depth 3] [--record]

1. Fixture: `posttrain init-model --preset small` and `posttrain data arithmetic`, then a short
   SFT of the whole model with MTP heads (`python -m posttrain sft recipes/sft_tiny_mtp.yaml`
   with overrides, bf16 autocast, `--train-steps` steps). Deviation from the bundled rows: the assistant
   answer is written out as a short worked solution ("12 + 34: 2 + 4 = 6, 1 + 3 = 4, so
   12 + 34 = 46.", about 30 tokens) instead of the bare sum (2-3 tokens), because with 3-token
   completions the prefill dominates and no decoding method can show a difference.
2. Measure: greedy generation (max_new_tokens 48) of the held-out prompts at batch 1 (one
   prompt per call, `--b1-prompts` prompts), 16 and 64, plain and speculative alternately after
   one warm-up each, `--repeats` times; median generated tokens/s. Outputs must be identical
   token for token (asserted). Records `rollout_speculative_b{1,16,64}` (ratio = spec / plain)
   with the acceptance rates per depth.
3. `speculative="auto"` at batch 64 against plain decoding (`rollout_speculative_auto_b64`,
   target >= 0.98x): the engine's default break-even (speculative.DEFAULT_BREAK_EVEN_ROWS)
   decides, not this run's numbers; the record also gives the break-even this run's own
   ratios imply (the smallest measured batch where speculation was slower).
   Pairs alternate in ABBA order (plain first in even pairs).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
WORK = BENCH / "work" / "speculative"


def worked(question: str, a: int, b: int) -> str:
    """A worked answer for a + b with two-digit a, b: units, tens with carry, result."""
    units = a % 10 + b % 10
    tens = a // 10 + b // 10 + units // 10
    carry = " + 1" if units >= 10 else ""
    return f"{a} + {b}: {a % 10} + {b % 10} = {units}, {a // 10} + {b // 10}{carry} = {tens}, so {a} + {b} = {a + b}."


def make_fixture(preset: str, kind: str, depth: int, steps: int, threads: int) -> Path:
    """Model + verbose arithmetic data + a short SFT with MTP heads; returns the final dir."""
    from posttrain.data.arithmetic import make_arithmetic
    from posttrain.models.presets import init_model

    run = WORK / f"{preset}_{kind}{depth}_{steps}_bf16"
    if (run / "final" / "mtp_heads.safetensors").is_file():
        return run / "final"
    data = WORK / "data"
    make_arithmetic(data, n=6000, n_test=200, seed=0)
    for split in ("train", "test"):
        rows = [json.loads(x) for x in (data / f"rl_{split}.jsonl").read_text().splitlines()]
        with (data / f"verbose_{split}.jsonl").open("w") as f:
            for row in rows:
                question = row["prompt"][0]["content"]
                a, b = (
                    int(x)
                    for x in question.replace("?", " ").replace(".", " ").split()
                    if x.isdigit()
                )
                reply = [{"role": "assistant", "content": worked(question, a, b)}]
                record = {"prompt": row["prompt"], "completion": reply, "answer": row["answer"]}
                f.write(json.dumps(record) + "\n")
    model_dir = init_model(WORK / f"{preset}-init", preset)
    overrides = {
        "model.name_or_path": model_dir,
        "model.mtp.kind": kind,
        "model.mtp.depth": depth,
        "data.train_path": data / "verbose_train.jsonl",
        "data.eval_path": "",
        "data.max_length": 96,
        "optim.lr": 2e-3,
        "optim.warmup_steps": 10,
        "train.output_dir": run,
        "train.max_steps": steps,
        "train.batch_size": 16,
        # bf16 autocast: about half of the fp32 time on CPU (make bench's 40 minutes); the
        # measurements below run the trained weights in float32 either way
        "train.mixed_precision": "bf16",
        "train.save_every": 0,
        "train.num_threads": threads,
        "logging.log_every": 10,
        "logging.progress": False,
    }
    argv = [sys.executable, "-m", "posttrain", "sft", "recipes/sft_tiny_mtp.yaml"]
    argv += [f"{k}={v}" for k, v in overrides.items()]
    started = time.perf_counter()
    subprocess.run(argv, check=True, cwd=REPO)
    print(f"trained {steps} steps in {time.perf_counter() - started:.0f} s")
    return run / "final"


def held_out(count: int, seed: int) -> tuple[list[list[dict]], list[str]]:
    rows = [json.loads(r) for r in (WORK / "data" / "verbose_test.jsonl").read_text().splitlines()]
    random.Random(seed).shuffle(rows)
    return [r["prompt"] for r in rows[:count]], [r["answer"] for r in rows[:count]]


def timed(engine, prompts, params, batch: int):
    """Generate in calls of `batch` prompts; returns (ids per row, tokens, seconds, stats)."""
    ids, tokens, seconds, stats = [], 0, 0.0, []
    for start in range(0, len(prompts), batch):
        t0 = time.perf_counter()
        out = engine.generate(prompts[start : start + batch], params)
        seconds += time.perf_counter() - t0
        tokens += int(out.completion_mask.sum())
        ids += [row[: int(n)] for row, n in zip(out.completion_ids.tolist(), out.lengths)]
        stats.append(dict(engine.last_stats))
    return ids, tokens, seconds, stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="small", choices=["tiny", "small"])
    parser.add_argument("--kind", default="medusa", choices=["medusa", "deepseek"])
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--train-steps", type=int, default=120)
    parser.add_argument("--batches", default="1,16,64")
    parser.add_argument("--b1-prompts", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--pairs", type=int, default=None, help="alias of --repeats (harness)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()
    repeats = max(args.pairs or args.repeats, 1)
    torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from posttrain.models.mtp import load_heads
    from posttrain.rollout import RolloutEngine, SamplingParams
    from posttrain.scoring.answers import is_correct

    final = make_fixture(args.preset, args.kind, args.depth, args.train_steps, args.threads)
    tokenizer = AutoTokenizer.from_pretrained(final)
    model = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32).to(args.device).eval()
    engine = RolloutEngine(model, tokenizer, mtp_heads=load_heads(model, final).eval())
    plain = SamplingParams(temperature=0.0, max_new_tokens=args.max_new_tokens)
    spec = SamplingParams(temperature=0.0, max_new_tokens=args.max_new_tokens, speculative="mtp")
    auto = SamplingParams(temperature=0.0, max_new_tokens=args.max_new_tokens, speculative="auto")

    records = []
    batches = [(int(b), spec) for b in args.batches.split(",")] + [(64, auto)]
    for batch, params_b in batches:
        prompts, answers = held_out(args.b1_prompts if batch == 1 else batch, seed=batch)
        timed(engine, prompts, plain, batch)  # warm-up
        timed(engine, prompts, params_b, batch)
        runs = {"plain": [], "spec": []}
        # auto at 64 rows decodes plainly: both sides run the same code, so the ratio is noise
        # around 1 and more pairs (cheap at this size) keep its median off the 0.98 line.
        for pair in range(max(repeats, 9) if params_b is auto else repeats):
            order = [("plain", plain), ("spec", params_b)]
            for name, params in order if pair % 2 == 0 else order[::-1]:  # ABBA
                ids, tokens, seconds, stats = timed(engine, prompts, params, batch)
                runs[name].append((ids, tokens, seconds, stats))
        for (ids_p, *_), (ids_s, *_) in zip(runs["plain"], runs["spec"], strict=True):
            assert ids_p == ids_s, f"batch {batch}: speculative output differs from plain greedy"
        rate = {k: statistics.median(t / s for _, t, s, _ in v) for k, v in runs.items()}
        stats = [s for run in runs["spec"] for s in run[3]]
        accept = {
            key: statistics.mean(s[key] for s in stats)
            for key in stats[0]
            if key.startswith("accept_rate") or key in ("tokens_per_forward", "speculative_chunks")
        }
        texts = tokenizer.batch_decode(runs["plain"][0][0], skip_special_tokens=True)
        correct = sum(is_correct(t, a) for t, a in zip(texts, answers, strict=True))
        pair_ratios = [
            (ts / ss) / (tp / sp)
            for (_, tp, sp, _), (_, ts, ss, _) in zip(runs["plain"], runs["spec"], strict=True)
        ]
        ratio = statistics.median(pair_ratios)  # the median of the per-pair ratios
        print(
            f"batch {batch:>3}: plain {rate['plain']:8.1f} tok/s  spec {rate['spec']:8.1f} tok/s"
            f"  ratio {ratio:.2f}x  (pairs {', '.join(f'{r:.2f}' for r in pair_ratios)})  "
            + "  ".join(f"{k} {v:.2f}" for k, v in accept.items())
            + f"  correct {correct}/{len(prompts)}"
        )
        name = f"rollout_speculative_{'auto_' if params_b is auto else ''}b{batch}"
        records.append(
            {
                "case": name,
                "metric": "generated_tokens_per_s",
                "posttrain": rate["spec"],
                "peer": rate["plain"],
                "ratio": ratio,
                "pairs": len(pair_ratios),
                "hw_mfu_posttrain": None,
                "hw_mfu_peer": None,
                "rss_posttrain_mib": None,  # one process holds both sides
                "rss_peer_mib": None,
                "peer_settings": {
                    "name": "plain decoding",
                    "call": "the same RolloutEngine, SamplingParams(speculative='none')",
                },
                "workload": "rollout",
                "pair_ratios": pair_ratios,
                "target": 1.5 if batch == 1 else 0.98 if params_b is auto else None,
                **accept,
                "identical_outputs": True,
                "settings": {
                    "preset": args.preset,
                    "mtp": f"{args.kind} depth {args.depth}",
                    "train_steps": args.train_steps,
                    "prompts": len(prompts),
                    "batch": batch,
                    "max_new_tokens": args.max_new_tokens,
                    "repeats": repeats,
                    "threads": args.threads,
                    "device": args.device,
                    "greedy_correct": correct,
                    "peer_call": "the same RolloutEngine, SamplingParams(speculative='none')",
                    "speculative": params_b.speculative,
                    "break_even_rows": engine.speculative_break_even,
                },
            }
        )
    measured = [r for r in records if "auto" not in r["case"]]
    slower = [r["settings"]["batch"] for r in measured if r["ratio"] < 1.0]
    records[-1]["settings"]["break_even_measured"] = min(slower) if slower else None
    if args.record:
        sys.path.insert(0, str(REPO))
        from bench.report import save_records

        save_records(records)
        print("recorded to bench/results/latest.jsonl")


if __name__ == "__main__":
    main()
