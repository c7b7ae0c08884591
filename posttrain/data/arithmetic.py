"""The bundled task: 2-digit addition, written in every format the trainers read.

`posttrain data arithmetic OUT_DIR` writes, for a train and a held-out test split:

| file                           | columns                          | used by         |
|--------------------------------|----------------------------------|-----------------|
| sft_{split}.jsonl              | messages                         | sft             |
| prompt_completion_{split}.jsonl| prompt, completion (message lists)| sft             |
| preference_{split}.jsonl       | prompt, chosen, rejected          | rm, dpo         |
| rl_{split}.jsonl               | prompt, answer                    | grpo, ppo, eval |

The held-out problems are a fixed set of operand pairs chosen by the seed before any training
example is drawn, so no test problem (a, b) ever appears in train, in any format.
Rejected answers are the mistakes a learner makes: a dropped carry, an extra carry, an
off-by-one, or swapped digits.
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


def _wrong_answer(a: int, b: int, rng: random.Random) -> int:
    right = a + b
    candidates = {right + 10, right - 10, right + 1, right - 1}
    digits = str(right)
    if len(digits) >= 2 and digits[-1] != digits[-2]:
        candidates.add(int(digits[:-2] + digits[-1] + digits[-2]))
    candidates.discard(right)
    candidates = {c for c in candidates if c >= 0}
    return rng.choice(sorted(candidates))


def _split_pairs(seed: int, n_test: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    pairs = [(a, b) for a in range(LOW, HIGH + 1) for b in range(LOW, HIGH + 1)]
    random.Random(seed).shuffle(pairs)
    return pairs[n_test:], pairs[:n_test]


def _rows(pairs: list[tuple[int, int]], rng: random.Random) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {"sft": [], "prompt_completion": [], "preference": [], "rl": []}
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
    return counts
