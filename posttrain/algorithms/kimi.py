"""Kimi k1.5 policy optimisation (spec section 8) on group rollouts (group_rl.py).

The squared mirror-descent loss `losses.kimi.kimi_loss` on each group's rewards, with the
policy that sampled the rollout (π_old) as the reference π_θi, refreshed every rollout; the
length penalty (`kimi_length` reward, the rule of `losses.kimi.kimi_length_penalty`) with a
weight warmed up linearly from 0; prompts drawn with probability ∝ (1 - success rate so far).

During the warm-up the logged `rewards/mean` and `rewards/std` are those of the rewards the loss
trains on (warmed weight), and `kimi_length_weight` is the weight used.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

from posttrain.algorithms.group_rl import GroupRL, GroupRolloutSettings
from posttrain.algorithms.rl_common import PrioritizedSampler, RewardFunctionConfig
from posttrain.config import (
    BaseRecipe,
    ConfigError,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
)
from posttrain.losses.kimi import kimi_loss
from posttrain.losses.types import LossOutput


@dataclass
class KimiConfig(GroupRolloutSettings):
    tau: PositiveFloat = 0.1
    """τ, the strength of the relative-entropy regulariser."""
    length_penalty_weight: NonNegativeFloat = 0.0
    """Final weight of the length reward (0: off)."""
    length_penalty_warmup_steps: NonNegativeInt = 0
    """Steps over which the length-reward weight rises linearly from 0."""
    prioritized_sampling: bool = False
    """Curriculum: draw prompts with probability ∝ (1 - success rate so far)."""


@dataclass
class KimiRecipe(BaseRecipe):
    kimi: KimiConfig = field(default_factory=KimiConfig)
    """Kimi k1.5 settings (sampling, rewards, τ, length penalty, curriculum)."""

    moved_keys: ClassVar[dict[str, str]] = {}

    @classmethod
    def check_moved(cls, data: dict) -> None:
        if "grpo" in data:
            raise ConfigError(
                "kimi: the settings moved from the 'grpo' section to a 'kimi' section (drop "
                "grpo.loss_type; see recipes/kimi_tiny.yaml)"
            )


class Kimi(GroupRL):
    name = "kimi"
    section = "kimi"

    def validate(self, accelerator: Accelerator) -> None:
        super().validate(accelerator)
        k = self.cfg.kimi
        if self.cfg.train.batch_size % k.num_generations:
            raise ConfigError(
                "kimi: train.batch_size must be a multiple of kimi.num_generations "
                "(each micro-batch holds whole groups)"
            )

    def reward_functions(self) -> list:
        k = self.cfg.kimi
        functions = list(k.rewards)
        if k.length_penalty_weight > 0:
            params = {"group_size": k.num_generations}
            functions.append(RewardFunctionConfig("kimi_length", k.length_penalty_weight, params))
        return functions

    def make_sampler(self):
        if self.cfg.kimi.prioritized_sampling:
            return PrioritizedSampler(len(self.data), self.cfg.train.seed)
        return super().make_sampler()

    def step_prompts(self, step: int) -> list[int]:
        if isinstance(self.sampler, PrioritizedSampler):
            return self.sampler.draw(step, self.cfg.kimi.prompts_per_step)
        return super().step_prompts(step)

    def length_weight(self, step: int) -> float:
        k = self.cfg.kimi
        if k.length_penalty_warmup_steps <= 0:
            return k.length_penalty_weight
        return k.length_penalty_weight * min(1.0, step / k.length_penalty_warmup_steps)

    def score(self, scores, step: int, indices: list[int]) -> tuple[torch.Tensor, dict]:
        k = self.cfg.kimi
        rewards, metrics = scores.rewards, {}
        if k.length_penalty_weight > 0:
            weights = {f.name: f.weight for f in k.rewards}
            weights["kimi_length"] = self.length_weight(step)
            rewards = scores.combine(weights)
            metrics = {
                "rewards/mean": float(rewards.mean()),
                "rewards/std": float(rewards.std(correction=0)),
                "kimi_length_weight": weights["kimi_length"],
            }
        if isinstance(self.sampler, PrioritizedSampler):
            fallback = (rewards > 0).float()
            success = scores.per_function.get("accuracy", fallback).view(-1, k.num_generations)
            for part in gather_object([list(zip(indices, success.mean(1).tolist()))]):
                self.sampler.update([i for i, _ in part], [s for _, s in part])
        return rewards, metrics

    def num_units(self, batch) -> int:
        return batch.num_sequences

    def compute_loss(self, model, batch) -> LossOutput:
        k = self.cfg.kimi
        logprobs, entropy = self.policy_logprobs(model, batch)
        mask = batch.completion_mask.bool()
        old = batch.old_logprobs if batch.old_logprobs is not None else logprobs.detach()
        seq, old_seq = (logprobs * mask).sum(-1), (old * mask).sum(-1)
        out = kimi_loss(seq, old_seq, batch.rewards, k.num_generations, k.tau)
        out.metrics["entropy"] = (entropy.detach() * mask).sum() / mask.sum().clamp(min=1)
        return out

    def state_dict(self) -> dict:
        state = super().state_dict()
        if isinstance(self.sampler, PrioritizedSampler):
            state["sampler"] = self.sampler.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if "sampler" in state and isinstance(self.sampler, PrioritizedSampler):
            self.sampler.load_state_dict(state["sampler"])
