"""Benchmark fixtures, made on this machine: a model from `posttrain init-model` and the
bundled arithmetic task from `posttrain data arithmetic`, with a free-text preamble of random
length in front of part of the prompts so that batches have ragged lengths (padding matters).

Layout (bench/work is git-ignored):

    bench/work/fixtures/{preset}/model/              init-model checkpoint + tokenizer
    bench/work/fixtures/data/                        posttrain data arithmetic output
    bench/work/fixtures/data/bench_sft.jsonl         prompt/completion message lists
    bench/work/fixtures/data/bench_preference.jsonl  prompt/chosen/rejected message lists
    bench/work/fixtures/data/bench_rl.jsonl          prompt message lists + reference `answer`

The same files feed both posttrain and TRL, so both sides train the same weights on the same
rows. Every row fits in `MAX_LENGTH` tokens, so neither side truncates anything.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

WORK = Path(__file__).resolve().parent / "work"
FIXTURES = WORK / "fixtures"
MAX_LENGTH = 128
ROWS = 800  # enough rows for (warm-up + timed steps) x 32 sequences without repeats
PREAMBLE_FRACTION = 0.5  # share of prompts that get a preamble
PREAMBLE_WORDS = (0, 60)  # word count range of a preamble
# Words the local BPE tokenizer knows (posttrain/models/tokenizer.py), about one token each.
WORDS = (
    "what is the sum of and plus minus equals answer question compute please solve think "
    "result number total add together give me a short reply let us find value here "
    "calculate quick check first then so we get final it this that for with to of in on"
).split()


def _posttrain(*args: str) -> None:
    subprocess.run(
        [sys.executable, "-m", "posttrain", *args], check=True, stdout=subprocess.DEVNULL
    )


def add_preamble(prompt: list[dict], rng: random.Random) -> list[dict]:
    """Prefix the user message with random free text on PREAMBLE_FRACTION of the prompts."""
    if rng.random() >= PREAMBLE_FRACTION:
        return prompt
    words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(*PREAMBLE_WORDS)))
    first = dict(prompt[0], content=f"{words.capitalize()}. {prompt[0]['content']}")
    return [first, *prompt[1:]]


# Fixture file -> the `posttrain data arithmetic` file it is made from (preamble added).
SOURCES = {
    "sft": ("bench_sft.jsonl", "prompt_completion_train.jsonl"),
    "preference": ("bench_preference.jsonl", "preference_train.jsonl"),
    "rl": ("bench_rl.jsonl", "rl_train.jsonl"),
}


def make_data(seed: int = 0) -> dict[str, Path]:
    data = FIXTURES / "data"
    paths = {kind: data / name for kind, (name, _) in SOURCES.items()}
    if not (data / "rl_train.jsonl").is_file():
        _posttrain("data", "arithmetic", str(data), "--n", str(ROWS), "--seed", str(seed))
    for kind, (_, source) in SOURCES.items():
        if paths[kind].is_file():
            continue
        rng = random.Random(f"{seed}-{kind}")
        with open(data / source) as src, open(paths[kind], "w") as dst:
            for line in src:
                row = json.loads(line)
                row["prompt"] = add_preamble(row["prompt"], rng)
                dst.write(json.dumps(row) + "\n")
    return paths


def make_model(preset: str, seed: int = 0) -> Path:
    model = FIXTURES / preset / "model"
    if not (model / "config.json").is_file():
        _posttrain("init-model", str(model), "--preset", preset, "--seed", str(seed))
    return model


def answers_of(row: dict, kind: str) -> list[list]:
    """The answers a row is trained on; an RL row has none (generation starts at the prompt)."""
    if kind == "sft":
        return [row["completion"]]
    if kind == "preference":
        return [row["chosen"], row["rejected"]]
    return [[]]


def length_stats(path: Path, model: Path, kind: str) -> dict:
    """Token lengths of the rendered rows (one per sequence), to report and for attention FLOPs."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    lengths = []
    with open(path) as f:
        for line in f:
            row = json.loads(line)
            answers = answers_of(row, kind)
            for answer in answers:  # rl: the prompt alone, as the generation starts from it
                text = tokenizer.apply_chat_template(
                    row["prompt"] + answer, tokenize=False, add_generation_prompt=not answer
                )
                lengths.append(len(tokenizer(text, add_special_tokens=False)["input_ids"]))
    if max(lengths) > MAX_LENGTH:
        raise RuntimeError(f"{path}: a row has {max(lengths)} tokens > MAX_LENGTH={MAX_LENGTH}")
    mean = sum(lengths) / len(lengths)
    mean_sq = sum(n * n for n in lengths) / len(lengths)
    return {"min": min(lengths), "max": max(lengths), "mean": mean, "mean_sq": mean_sq}


def make_fixtures(preset: str) -> dict:
    """Create (or reuse) the model and data for `preset`; returns their paths and length stats."""
    data = make_data()
    model = make_model(preset)
    return {
        "model": model,
        **{f"{kind}_data": path for kind, path in data.items()},
        "lengths": {kind: length_stats(path, model, kind) for kind, path in data.items()},
    }


if __name__ == "__main__":
    print(
        json.dumps(
            make_fixtures(sys.argv[1] if len(sys.argv) > 1 else "tiny"), default=str, indent=1
        )
    )
