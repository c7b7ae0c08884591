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

Three workloads (`WORKLOADS`):

- **shared-prompt** (the files above, `MAX_LENGTH`): long shared prompts (0-60 word preamble on
  half of them) and 2-3 token answers. Built to show what prefix sharing and padding-free
  batches save; it flatters posttrain.
- **long** (`bench_*_long.jsonl`, `MAX_LENGTH_LONG`): what ordinary chat data looks like: short
  prompts (10-40 tokens) and responses of 100-500 tokens; DPO/RM chosen and rejected drawn
  independently, so they differ in length. The GRPO prompts are the same short prompts
  (generation is 256 new tokens, set in bench/harness.py).
- **bigvocab** (`bigvocab/model`, `bench_*_bigvocab.jsonl`, `MAX_LENGTH_BIG`): the small preset's
  width with a 151,936-token vocabulary (Qwen's size), so the [batch, length, vocab] logits
  dominate memory; SFT rows of 1,024 tokens, GRPO prompts of 960 tokens + 64 new tokens.
  The tokenizer is the local one (2k tokens): the ids above it are never seen in the data, as
  most of a real checkpoint's vocabulary is absent from any one batch, but every logit is
  computed.
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
MAX_LENGTH_LONG = 640  # prompt (<= 40 tokens) + template + response (<= 500 tokens)
MAX_LENGTH_BIG = 1024
BIG_VOCAB = 151_936  # Qwen2/2.5/3's vocabulary size
PROMPT_TOKENS = (10, 40)  # long workload: prompt length range (rendered user message)
RESPONSE_TOKENS = (100, 500)  # long workload: response length range
LONG_ROWS = 200  # (warm-up + timed steps) x batch stays far below this
# bigvocab GRPO: prompt tokens + new tokens = 1,024. 64 new tokens, not 128: the sequence the
# training forward sees is as long, and make bench keeps within its 40 minutes (TRL decodes
# ~0.2 s a token here).
BIG_PROMPT = 960
BIG_NEW_TOKENS = 64
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


_STATS: dict[tuple, dict] = {}  # one tokenisation per file and process (make_fixtures per case)


def length_stats(path: Path, model: Path, kind: str, max_length: int = MAX_LENGTH) -> dict:
    """Token lengths of the rendered rows (one per sequence), to report and for attention FLOPs."""
    key = (str(path), str(model), kind, max_length)
    if key not in _STATS:
        _STATS[key] = _length_stats(path, model, kind, max_length)
    return _STATS[key]


def _length_stats(path: Path, model: Path, kind: str, max_length: int) -> dict:
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
    if max(lengths) > max_length:
        raise RuntimeError(f"{path}: a row has {max(lengths)} tokens > max_length={max_length}")
    mean = sum(lengths) / len(lengths)
    mean_sq = sum(n * n for n in lengths) / len(lengths)
    return {"min": min(lengths), "max": max(lengths), "mean": mean, "mean_sq": mean_sq}


def words_to_length(tokenizer, rng: random.Random, target: int, head: str = "") -> str:
    """`head` followed by random WORDS, cut so that the text encodes to `target` tokens (or one
    fewer: a word may be two tokens)."""
    words: list[str] = []
    count = lambda: len(tokenizer((head + " ".join(words)), add_special_tokens=False)["input_ids"])  # noqa: E731
    while count() < target:
        words += [rng.choice(WORDS) for _ in range(max(1, (target - count()) // 2))]
    while count() > target:
        words.pop()
    return head + " ".join(words)


def long_rows(kind: str, tokenizer, rng: random.Random, source: list[dict]) -> list[dict]:
    """The long workload's rows from the arithmetic rows: a question cut/padded to 10-40 prompt
    tokens, responses of 100-500 tokens that end in the answer."""
    rows = []
    for row in source[:LONG_ROWS]:
        question = row["prompt"][-1]["content"]
        prompt_len = rng.randint(*PROMPT_TOKENS)
        q_len = len(tokenizer(question, add_special_tokens=False)["input_ids"])
        text = words_to_length(tokenizer, rng, prompt_len, "") if prompt_len > q_len else ""
        text = (text.capitalize() + ". " if text else "") + question
        prompt = [{"role": "user", "content": text}]

        def response(answer: str) -> list[dict]:
            body = words_to_length(tokenizer, rng, rng.randint(*RESPONSE_TOKENS) - 8)
            return [{"role": "assistant", "content": f"{body}. <answer>{answer}</answer>"}]

        if kind == "sft":
            answer = row["completion"][-1]["content"]
            rows.append({"prompt": prompt, "completion": response(answer)})
        elif kind == "preference":
            good, bad = row["chosen"][-1]["content"], row["rejected"][-1]["content"]
            rows.append({"prompt": prompt, "chosen": response(good), "rejected": response(bad)})
        else:
            rows.append({"prompt": prompt, "answer": row["answer"]})
    return rows


def big_rows(kind: str, tokenizer, rng: random.Random, source: list[dict]) -> list[dict]:
    """bigvocab rows: SFT prompt + response filling MAX_LENGTH_BIG tokens with the template;
    RL prompts of BIG_PROMPT tokens."""
    rows = []
    for row in source[:64]:
        question = row["prompt"][-1]["content"]
        if kind == "sft":
            prompt = [{"role": "user", "content": question}]
            body = words_to_length(tokenizer, rng, MAX_LENGTH_BIG - 40)
            rows.append({"prompt": prompt, "completion": [{"role": "assistant", "content": body}]})
        else:
            text = words_to_length(tokenizer, rng, BIG_PROMPT - 30) + ". " + question
            rows.append({"prompt": [{"role": "user", "content": text}], "answer": row["answer"]})
    return rows


def make_workload_data(workload: str, tokenizer_dir: Path, seed: int = 0) -> dict[str, Path]:
    """bench_{sft,preference,rl}_{workload}.jsonl from the arithmetic rows (made once)."""
    from transformers import AutoTokenizer

    make_data(seed)
    data = FIXTURES / "data"
    kinds = ("sft", "preference", "rl") if workload == "long" else ("sft", "rl")
    paths = {kind: data / f"bench_{kind}_{workload}.jsonl" for kind in kinds}
    build = long_rows if workload == "long" else big_rows
    tokenizer = None
    for kind, path in paths.items():
        if path.is_file():
            continue
        tokenizer = tokenizer or AutoTokenizer.from_pretrained(tokenizer_dir)
        source = [json.loads(x) for x in (data / SOURCES[kind][1]).read_text().splitlines()]
        rows = build(kind, tokenizer, random.Random(f"{seed}-{workload}-{kind}"), source)
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        tmp.rename(path)
    return paths


def make_big_model(seed: int = 0) -> Path:
    """The small preset's width and depth with a BIG_VOCAB-token vocabulary (tied embeddings)."""
    model = FIXTURES / "bigvocab" / "model"
    if (model / "config.json").is_file():
        return model
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    from posttrain.models.presets import PRESETS, model_config
    from posttrain.models.tokenizer import build_tokenizer

    tokenizer = build_tokenizer(vocab_size=PRESETS["small"]["vocab_size"])
    config = model_config("small", "llama", tokenizer)
    config.vocab_size = BIG_VOCAB
    config.max_position_embeddings = MAX_LENGTH_BIG + 64
    torch.manual_seed(seed)
    net = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    net.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    )
    tmp = model.with_name("model.tmp")
    net.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(model)
    return model


def make_fixtures(preset: str) -> dict:
    """Create (or reuse) the model and data for `preset`; returns their paths and length stats."""
    data = make_data()
    model = make_model(preset)
    out = {
        "model": model,
        **{f"{kind}_data": path for kind, path in data.items()},
        "lengths": {kind: length_stats(path, model, kind) for kind, path in data.items()},
    }
    if preset == "tiny":  # the development loop only runs the shared-prompt cases
        return out
    for workload, max_length in (("long", MAX_LENGTH_LONG), ("bigvocab", MAX_LENGTH_BIG)):
        paths = make_workload_data(workload, model)
        for kind, path in paths.items():
            out[f"{kind}_{workload}_data"] = path
            out["lengths"][f"{kind}_{workload}"] = length_stats(path, model, kind, max_length)
    out["bigvocab_model"] = make_big_model()
    return out


if __name__ == "__main__":
    print(
        json.dumps(
            make_fixtures(sys.argv[1] if len(sys.argv) > 1 else "tiny"), default=str, indent=1
        )
    )
