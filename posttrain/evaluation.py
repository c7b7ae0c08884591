"""`posttrain eval`: exact-match accuracy of a model on prompt/answer rows.

Greedy accuracy always; with samples=K>1 also pass@K (some of K samples at temperature 1 is
right) and the mean per-sample accuracy. Generation goes through the shared RolloutEngine.
A completion is right when its extracted final answer (answer tags, \\boxed{}, or the last
number) equals the reference, numerically where both are numbers.
"""

from __future__ import annotations

import time

import torch

from posttrain.config import ModelConfig
from posttrain.data.loading import load_rows, require_columns
from posttrain.models.loading import load_causal_lm, load_tokenizer
from posttrain.rollout import RolloutEngine, SamplingParams
from posttrain.scoring.answers import is_correct


def accuracy_of(
    engine: RolloutEngine,
    prompts: list,
    answers: list,
    max_new_tokens: int,
    samples: int = 1,
    seed: int = 0,
) -> dict:
    started = time.perf_counter()
    greedy = engine.generate(
        prompts, SamplingParams(n=1, temperature=0.0, max_new_tokens=max_new_tokens)
    )
    right = [is_correct(t, a) for t, a in zip(greedy.texts, answers)]
    result = {"accuracy": sum(right) / len(right), "n": len(right)}
    if samples > 1:
        sampled = engine.generate(
            prompts,
            SamplingParams(n=samples, temperature=1.0, max_new_tokens=max_new_tokens, seed=seed),
        )
        per_sample = torch.tensor(
            [is_correct(t, answers[int(g)]) for t, g in zip(sampled.texts, sampled.group_ids)]
        ).view(len(prompts), samples)
        result[f"pass@{samples}"] = float(per_sample.any(dim=1).float().mean())
        result["sample_accuracy"] = float(per_sample.float().mean())
    result["seconds"] = time.perf_counter() - started
    return result


def evaluate_model(
    model_dir: str,
    data_path: str,
    max_new_tokens: int = 16,
    samples: int = 1,
    limit: int | None = None,
    seed: int = 0,
    trust_remote_code: bool = False,
) -> dict:
    rows = load_rows(data_path)
    require_columns(
        rows, ["prompt", "answer"], data_path, "'prompt' and 'answer' (rl_*.jsonl rows)"
    )
    if limit is not None:
        rows = rows.select(range(min(limit, len(rows))))
    tokenizer = load_tokenizer(model_dir, trust_remote_code)
    model = load_causal_lm(ModelConfig(name_or_path=model_dir, trust_remote_code=trust_remote_code))
    if torch.cuda.is_available():
        model = model.to("cuda")
    engine = RolloutEngine(model, tokenizer)
    result = accuracy_of(engine, rows["prompt"], rows["answer"], max_new_tokens, samples, seed)
    return {"model": str(model_dir), "data": str(data_path), **result}
