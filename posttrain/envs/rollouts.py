"""Scored multi-turn rollouts: sessions per sample, the driver (rollout/multiturn.py), rewards.

A sample's reward is the sum of its environment's step rewards (failure_reward when a step
failed) plus the recipe's reward functions on its LAST assistant turn (`rollout.texts`), e.g.
`accuracy` against the row's `answer`. With no reward functions (`rewards: []`) the
environment's rewards are the whole reward.
"""

from __future__ import annotations

import dataclasses

import torch

from posttrain.envs.session import EnvRunner
from posttrain.rollout import RolloutBatch, RolloutEngine, SamplingParams
from posttrain.rollout.multiturn import MultiTurnDriver
from posttrain.scoring import ScoreResult
from posttrain.scoring.answers import is_correct


def environment_rollout(
    policy,
    tokenizer,
    runner: EnvRunner,
    rows: list[dict],
    params: SamplingParams,
    max_turns: int,
    prompt_seeds: list[int] | None,
    where: str,
) -> tuple[RolloutBatch, list, dict]:
    """(rollout, sessions, engine stats): params.n conversations of each row, one environment
    instance each (rows [g*n:(g+1)*n] are row g)."""
    engine = RolloutEngine(policy, tokenizer)
    sessions = [
        runner.session(row, f"{where}: row {i + 1}")
        for i, row in enumerate(rows)
        for _ in range(params.n)
    ]
    driver = MultiTurnDriver(engine, params, max_turns)
    rollout = driver.generate(sessions, prompt_seeds=prompt_seeds)
    sampled = int(rollout.sampled_mask.sum())
    stats = {
        "prompts": len(rows),
        "samples": len(rollout),
        "prompt_tokens": sum(len(s.prompt_ids) for s in sessions[:: params.n]),
        "generated_tokens": sampled,
        "forward_passes": driver.forward_passes,
        "env_cut_off": driver.cut_off,
    }
    return rollout, sessions, stats


def environment_generate_and_score(
    policy,
    tokenizer,
    data,
    scorer,
    runner: EnvRunner,
    indices: list[int],
    params: SamplingParams,
    max_turns: int,
):
    """As rl_common.generate_and_score, with the conversations run in the environment."""
    import time

    started = time.perf_counter()
    rows = [dict(data.rows[i]) for i in indices]
    seeds = [params.seed * 1_000_003 + i for i in indices]
    rollout, sessions, stats = environment_rollout(
        policy, tokenizer, runner, rows, params, max_turns, seeds, data.path
    )
    env_rewards = torch.tensor([s.reward for s in sessions], dtype=torch.float32)
    metrics = {**runner.metrics(sessions), "env/cut_off": stats["env_cut_off"] / len(sessions)}
    metrics["env/sampled_tokens"] = stats["generated_tokens"] / len(sessions)
    if scorer is None:
        scored = ScoreResult(rewards=env_rewards, per_function={}, metrics={})
    else:
        scored = scorer(
            [data.prompts[i] for i in indices for _ in range(params.n)],
            rollout.texts,
            completion_lengths=rollout.sampled_mask.sum(dim=1).tolist(),
            truncated=rollout.truncated.tolist(),
            **data.columns_for(indices, params.n),
        )
        scored = dataclasses.replace(
            scored, rewards=scored.rewards + env_rewards.to(scored.rewards)
        )
    scored = dataclasses.replace(scored, metrics={**scored.metrics, **metrics})
    seconds = time.perf_counter() - started
    stats.update(
        seconds=seconds,
        tokens_per_s=stats["generated_tokens"] / max(seconds, 1e-9),
        prompts_truncated=0.0,
    )
    return rollout, scored, stats


@torch.no_grad()
def environment_accuracy(
    policy,
    tokenizer,
    runner: EnvRunner,
    rows: list[dict],
    max_new_tokens: int,
    max_turns: int,
    where: str = "eval",
) -> dict:
    """Greedy multi-turn exact match: the last assistant turn's answer against `answer`."""
    params = SamplingParams(n=1, temperature=0.0, max_new_tokens=max_new_tokens)
    rollout, sessions, _ = environment_rollout(
        policy, tokenizer, runner, rows, params, max_turns, None, where
    )
    right = [is_correct(t, row.get("answer")) for t, row in zip(rollout.texts, rows)]
    metrics = runner.metrics(sessions)
    return {"accuracy": sum(right) / max(len(right), 1), "n": len(right), **metrics}


def evaluate_in_environment(
    model_dir: str,
    data_path: str,
    environment: str = "tools",
    tools: list[str] = ("calculator",),
    max_new_tokens: int = 80,
    max_turns: int = 3,
    limit: int | None = None,
) -> dict:
    """Greedy multi-turn exact match of a saved model on prompt/answer rows (the demo's `tools`
    stage measures with this)."""
    from posttrain.config import ModelConfig
    from posttrain.data.loading import load_rows
    from posttrain.models.loading import load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(model_dir, False)
    model = load_causal_lm(ModelConfig(name_or_path=model_dir))
    rows = [dict(r) for r in load_rows(data_path)]
    rows = rows[:limit] if limit else rows
    runner = EnvRunner(environment, tokenizer, tools=list(tools))
    return environment_accuracy(
        model, tokenizer, runner, rows, max_new_tokens, max_turns, data_path
    )
