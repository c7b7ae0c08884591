"""The bundled task: 2-digit addition, written in every format the trainers read.

`posttrain data arithmetic OUT_DIR` writes, for a train and a held-out test split:

| file                           | columns                          | used by         |
|--------------------------------|----------------------------------|-----------------|
| sft_{split}.jsonl              | messages                         | sft             |
| prompt_completion_{split}.jsonl| prompt, completion (message lists)| sft             |
| preference_{split}.jsonl       | prompt, chosen, rejected          | rm, dpo         |
| preference_all_train.jsonl     | prompt, chosen, rejected          | rm              |
| rl_{split}.jsonl               | prompt, answer                    | grpo, ppo, eval |
| kto_{split}.jsonl              | prompt, completion, label (bool)  | kto             |

The held-out problems are a fixed set of operand pairs chosen by the seed before any training
example is drawn, so no test problem (a, b) ever appears in train, in any format.
Rejected answers are the mistakes a learner makes: a dropped carry, an extra carry, an
off-by-one, or swapped digits. `preference_{split}` pairs each drawn problem with one of them;
`preference_all_train` pairs every training problem with each of its mistakes (~37k pairs), so a
reward model that must learn to check sums sees every kind of near miss instead of memorising
a few thousand pairs (it overfits those: 95% train against 88% held-out).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

LOW, HIGH = 10, 99  # two-digit operands
PROMPT_TEMPLATES = (
    "What is {a} + {b}?",
    "Compute {a} + {b}.",
    "{a} + {b} = ?",
)


def _mistakes(a: int, b: int) -> list[int]:
    """Every near miss of a + b, sorted."""
    right = a + b
    candidates = {right + 10, right - 10, right + 1, right - 1}
    digits = str(right)
    if len(digits) >= 2 and digits[-1] != digits[-2]:
        candidates.add(int(digits[:-2] + digits[-1] + digits[-2]))
    candidates.discard(right)
    return sorted(c for c in candidates if c >= 0)


def _wrong_answer(a: int, b: int, rng: random.Random) -> int:
    return rng.choice(_mistakes(a, b))


def _all_mistake_rows(pairs: list[tuple[int, int]], rng: random.Random) -> list[dict]:
    rows = []
    for a, b in pairs:
        reply = [{"role": "assistant", "content": str(a + b)}]
        for wrong in _mistakes(a, b):
            question = rng.choice(PROMPT_TEMPLATES).format(a=a, b=b)
            rows.append(
                {
                    "prompt": [{"role": "user", "content": question}],
                    "chosen": reply,
                    "rejected": [{"role": "assistant", "content": str(wrong)}],
                }
            )
    rng.shuffle(rows)
    return rows


def _split_pairs(seed: int, n_test: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    pairs = [(a, b) for a in range(LOW, HIGH + 1) for b in range(LOW, HIGH + 1)]
    random.Random(seed).shuffle(pairs)
    return pairs[n_test:], pairs[:n_test]


def _rows(pairs: list[tuple[int, int]], rng: random.Random) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {
        "sft": [],
        "prompt_completion": [],
        "preference": [],
        "rl": [],
        "kto": [],
    }
    for a, b in pairs:
        question = rng.choice(PROMPT_TEMPLATES).format(a=a, b=b)
        answer = str(a + b)
        user = [{"role": "user", "content": question}]
        reply = [{"role": "assistant", "content": answer}]
        wrong = [{"role": "assistant", "content": str(_wrong_answer(a, b, rng))}]
        out["sft"].append({"messages": user + reply})
        out["prompt_completion"].append({"prompt": user, "completion": reply})
        out["preference"].append({"prompt": user, "chosen": reply, "rejected": wrong})
        out["rl"].append({"prompt": user, "answer": answer})
        # KTO's unpaired rows: the right answer is desirable, the mistake undesirable
        out["kto"].append({"prompt": user, "completion": reply, "label": True})
        out["kto"].append({"prompt": user, "completion": wrong, "label": False})
    return out


def make_arithmetic(out_dir: str | Path, n: int = 6000, n_test: int = 500, seed: int = 0) -> dict:
    """Write the task to `out_dir`; returns {file name: row count}.

    n train rows are drawn with replacement from the train pairs (8,100 - n_test of them), so
    n may exceed the number of distinct problems.
    """
    if n_test >= (HIGH - LOW + 1) ** 2:
        raise ValueError(f"n_test={n_test} leaves no training problems")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train_pairs, test_pairs = _split_pairs(seed, n_test)
    rng = random.Random(seed + 1)
    train_draw = [rng.choice(train_pairs) for _ in range(n)]
    counts = {}
    for split, pairs in (("train", train_draw), ("test", test_pairs)):
        for kind, rows in _rows(pairs, rng).items():
            path = out_dir / f"{kind}_{split}.jsonl"
            with path.open("w") as f:
                for row in rows:
                    f.write(json.dumps(row) + "\n")
            counts[path.name] = len(rows)
    # Its own generator, so the files above are the same with or without this one.
    path = out_dir / "preference_all_train.jsonl"
    rows = _all_mistake_rows(train_pairs, random.Random(seed + 2))
    with path.open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    counts[path.name] = len(rows)
    return counts
