"""DAPO dynamic sampling (Yu et al. 2025, §3.2): keep only groups whose rewards differ and refill
the rollout from new prompts, so every group carries a learning signal.

Refill prompts come from a generator seeded by (train.seed, step) and drawn round after round
from one permutation of the data set: rounds of one step never repeat a prompt (while the data
set lasts), steps never share a key, and the whole data set is reachable. (The earlier key
`step * 16 + round` collided with the next step after 15 rounds and used 1/16 of each epoch.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from posttrain.algorithms.group_rl import group_spread
from posttrain.algorithms.rl_common import process_share
from posttrain.config import NonNegativeInt
from posttrain.rollout import RolloutBatch


@dataclass
class DAPOConfig:
    dynamic_sampling: bool = False
    """Drop groups whose rewards are all equal and refill from new prompts."""
    max_refill_rounds: NonNegativeInt = 3
    """Extra generation rounds dynamic sampling may use per rollout."""


def refill_indices(num_prompts: int, seed: int, step: int, round_: int, count: int) -> list[int]:
    """Global prompt indices of refill round `round_` (1-based) of `step`: the next `count`
    positions of a stream of permutations seeded by (seed, step); the same on every process."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    needed = round_ * count
    stream: list[int] = []
    while len(stream) < needed:
        stream += torch.randperm(num_prompts, generator=generator).tolist()
    return stream[needed - count : needed]


def dynamic_sampling(algo, step, accelerator, model, rollout, rewards, seed) -> tuple:
    """(rollout, rewards, metrics) with only groups that have reward spread, refilled from new
    prompts for up to `dapo.max_refill_rounds` rounds; `algo` is the GRPO trainer."""
    g, rounds_max = algo.settings, algo.cfg.dapo.max_refill_rounds
    G = g.num_generations
    wanted = len(rollout) // G
    kept_rollouts, kept_rewards = [], []
    rounds = 0
    while True:
        keep_rows = group_spread(rewards, G).repeat_interleave(G)
        kept_rollouts.append(rollout.select(keep_rows))
        kept_rewards.append(rewards[keep_rows])
        have = sum(len(r) for r in kept_rollouts) // G
        if have >= wanted or rounds >= rounds_max:
            break
        rounds += 1
        global_indices = refill_indices(
            len(algo.data), algo.cfg.train.seed, step, rounds, g.prompts_per_step
        )
        extra = process_share(global_indices, accelerator)
        rollout, scores, _ = algo.generate(model, accelerator, extra, seed + 104_729 * rounds)
        rewards, _ = algo.score(scores, step, extra)
    metrics = {"refill_rounds": float(rounds)}
    if not any(len(r) for r in kept_rollouts):
        # Every group was uninformative: keep the last draw; its advantages are all zero.
        return rollout, rewards, metrics
    merged = RolloutBatch.concat([r for r in kept_rollouts if len(r)], algo.tokenizer.pad_token_id)
    rewards = torch.cat(kept_rewards)
    if len(merged) > wanted * G:
        merged, rewards = merged.select(torch.arange(wanted * G)), rewards[: wanted * G]
    return merged, rewards, metrics
