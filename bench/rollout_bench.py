"""Generated tokens per second: posttrain's RolloutEngine vs Hugging Face `model.generate`.

    python bench/rollout_bench.py --preset small --n 8 --prompts 8 --max-new-tokens 32 [--record]

Both sides sample n completions at temperature 1 (no top-k / top-p) for the same left-padded
prompts of mixed length (arithmetic questions after a free-text preamble of random length):

- posttrain: `RolloutEngine.generate` (prefill once per prompt, KV cache copied to n rows,
  finished rows leave the batch);
- peer: `model.generate(do_sample=True, num_return_sequences=n)` (prefills prompts * n rows,
  keeps finished rows in the batch as padding until every row is done).

Tokens are counted the same way on both sides: per row, the tokens up to and including the
first EOS, or max_new_tokens if there is none. Random-weight models rarely emit EOS, so the
two sides generate nearly the same number of tokens; the table shows both counts.
Runs alternate in ABBA order after one warm-up each; the ratio is the median of the per-pair
ratios.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from posttrain.models.presets import init_model
from posttrain.rollout import RolloutEngine, SamplingParams
from posttrain.utils import left_pad

WORDS = "let us think about this problem carefully and then give the final answer".split()


def make_prompts(count: int, seed: int) -> list[list[dict]]:
    """Chat prompts whose length varies several-fold: a random preamble, then a question."""
    rng = random.Random(seed)
    prompts = []
    for _ in range(count):
        preamble = " ".join(rng.choice(WORDS) for _ in range(rng.randint(0, 40)))
        question = f"What is {rng.randint(10, 99)} + {rng.randint(10, 99)}?"
        prompts.append([{"role": "user", "content": f"{preamble} {question}".strip()}])
    return prompts


def tokens_until_eos(new_tokens: torch.Tensor, eos_ids: list[int]) -> int:
    """Generated tokens per row up to and including the first EOS, summed. (R, M) -> int."""
    is_eos = torch.isin(new_tokens, torch.tensor(eos_ids, device=new_tokens.device))
    first = torch.where(is_eos.any(1), is_eos.float().argmax(1) + 1, new_tokens.shape[1])
    return int(first.sum())


def run_posttrain(engine, prompts, args, seed) -> tuple[int, float]:
    params = SamplingParams(
        n=args.n, temperature=1.0, max_new_tokens=args.max_new_tokens, seed=seed
    )
    started = time.perf_counter()
    batch = engine.generate(prompts, params)
    return int(batch.completion_mask.sum()), time.perf_counter() - started


def run_peer(model, input_ids, attention_mask, eos_ids, args, seed) -> tuple[int, float]:
    torch.manual_seed(seed)
    started = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            input_ids,
            attention_mask=attention_mask,
            do_sample=True,
            num_return_sequences=args.n,
            max_new_tokens=args.max_new_tokens,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
        )
    seconds = time.perf_counter() - started
    return tokens_until_eos(out[:, input_ids.shape[1] :], eos_ids), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="small", choices=["tiny", "small"])
    parser.add_argument(
        "--model-dir", default=None, help="use this checkpoint instead of init_model"
    )
    parser.add_argument("--n", type=int, default=8, help="samples per prompt")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--pairs", type=int, default=5, help="timed ABBA pairs (>= 5)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--record", action="store_true", help="append to bench/results/latest.jsonl"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model_dir = args.model_dir or init_model(Path(tempfile.mkdtemp()) / args.preset, args.preset)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = (
        AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(args.device).eval()
    )
    engine = RolloutEngine(model, tokenizer)
    prompts = make_prompts(args.prompts, args.seed)
    encoded = [engine.encode(p) for p in prompts]
    input_ids, attention_mask = left_pad(encoded, tokenizer.pad_token_id, args.device)
    eos_ids = sorted({tokenizer.eos_token_id, model.generation_config.eos_token_id})

    sides = {
        "posttrain": lambda seed: run_posttrain(engine, prompts, args, seed),
        "peer": lambda seed: run_peer(model, input_ids, attention_mask, eos_ids, args, seed),
    }
    for side in sides.values():  # warm-up
        side(args.seed)
    results: dict[str, list[tuple[int, float]]] = {name: [] for name in sides}
    for pair in range(args.pairs):
        order = list(sides.items())
        for name, side in order if pair % 2 == 0 else order[::-1]:
            results[name].append(side(args.seed + 1 + pair))
            if args.device == "cuda":
                torch.cuda.synchronize()

    rates = {name: statistics.median(t / s for t, s in runs) for name, runs in results.items()}
    lengths = [len(ids) for ids in encoded]
    print(
        f"preset={args.preset} device={args.device} threads={args.threads} prompts={args.prompts} "
        f"n={args.n} max_new_tokens={args.max_new_tokens} prompt tokens {min(lengths)}..{max(lengths)} "
        f"pairs={args.pairs}"
    )
    print(f"{'side':<10} {'tokens/s (median)':>18} {'seconds (median)':>17} {'tokens/run':>11}")
    for name, runs in results.items():
        seconds = statistics.median(s for _, s in runs)
        tokens = statistics.median(t for t, _ in runs)
        print(f"{name:<10} {rates[name]:>18.1f} {seconds:>17.3f} {tokens:>11.0f}")
    pair_ratios = [
        (t_a / s_a) / (t_b / s_b)
        for (t_a, s_a), (t_b, s_b) in zip(results["posttrain"], results["peer"], strict=True)
    ]
    ratio = statistics.median(pair_ratios)
    print(
        f"ratio posttrain / peer: {ratio:.2f}x (per pair: {', '.join(f'{r:.2f}' for r in pair_ratios)})"
    )

    if args.record:
        record = {
            "case": f"rollout_{args.preset}",
            "metric": "generated_tokens_per_s",
            "posttrain": rates["posttrain"],
            "peer": rates["peer"],
            "ratio": ratio,
            "pairs": args.pairs,
            "hw_mfu_posttrain": None,
            "hw_mfu_peer": None,
            "rss_posttrain_mib": None,  # one process holds both sides
            "rss_peer_mib": None,
            "peer_settings": {
                "name": "transformers",
                "call": "model.generate(do_sample=True, num_return_sequences=n)",
            },
            "workload": "rollout",
            "pair_ratios": pair_ratios,
            "tokens_per_run": {
                name: statistics.median(t for t, _ in runs) for name, runs in results.items()
            },
            "settings": {
                "n": args.n,
                "prompts": args.prompts,
                "max_new_tokens": args.max_new_tokens,
                "pairs": args.pairs,
                "threads": args.threads,
                "device": args.device,
                "prompt_tokens": [min(lengths), max(lengths)],
                "peer_call": "model.generate(do_sample=True, num_return_sequences=n, temperature=1, top_k=0, top_p=1)",
            },
        }
        import sys

        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        from bench.report import LATEST, save_records

        save_records([record])  # replaces an earlier record of the same case
        print(f"recorded to {LATEST}")


if __name__ == "__main__":
    main()
