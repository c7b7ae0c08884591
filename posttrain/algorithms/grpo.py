"""GRPO and its variants Dr. GRPO, DAPO (spec section 7), GSPO, GSPO-token and CISPO (section
13) on group rollouts (group_rl.py).

Rewards become group-relative advantages (`losses.grpo.group_advantages`), or with
`grpo.advantage` rloo / reinforce_pp those of `policy_objective.advantages`; the policy loss
comes from `losses.policy.POLICY_LOSSES[grpo.loss_type]` (through `policy_objective.policy_loss`,
which applies `grpo.rollout_correction` and the clip defaults), whose aggregation fixes the loss
units (`num_units`). DAPO's dynamic sampling is `dapo.py` (its own `dapo:` section); Kimi k1.5
is `kimi.py` (`posttrain kimi`, its own `kimi:` section).

Deliberate choice: dr_grpo never divides advantages by the std (the spec), whatever
scale_rewards says.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, ClassVar, Literal

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, gather_object

from posttrain.algorithms import policy_objective
from posttrain.algorithms.dapo import DAPOConfig, dynamic_sampling
from posttrain.algorithms.group_rl import GroupRL, GroupRolloutSettings
from posttrain.algorithms.rl_common import load_reference
from posttrain.config import BaseRecipe, ConfigError, NonNegativeFloat, Range
from posttrain.losses.grpo import group_advantages
from posttrain.losses.policy import POLICY_LOSSES
from posttrain.losses.types import LossOutput


@dataclass
class GRPOConfig(GroupRolloutSettings):
    loss_type: Literal["grpo", "dr_grpo", "dapo", "gspo", "gspo_token", "cispo"] = "grpo"
    """Policy loss: the clipped objective's aggregations (spec section 7) or GSPO / GSPO-token /
    CISPO (section 13, docs/algorithms.md); Kimi is `posttrain kimi`."""
    advantage: Literal["group", "rloo", "reinforce_pp"] = "group"
    """Advantage estimator: group-normalised, RLOO leave-one-out, or REINFORCE++ (KL in the
    reward with coefficient beta, per-token returns normalised over the global batch)."""
    rollout_correction: Literal["none", "tis", "mis"] = "none"
    """Rollout/trainer mismatch correction: TIS weights tokens by min(π_old/μ, cap), MIS drops
    tokens whose ratio leaves [1/cap, cap]."""
    rollout_correction_cap: Annotated[float, Range(gt=1)] = 2.0
    """C of the rollout correction (> 1)."""
    scale_rewards: Literal["group", "batch", "none"] = "group"
    """Divide centred rewards by the group std, the batch std, or nothing."""
    epsilon_low: Annotated[float, Range(ge=0, le=1)] | None = None
    """Lower clip ε_low of the ratio; null: the loss's paper default (0.2; GSPO 3e-4; CISPO 1)."""
    epsilon_high: NonNegativeFloat | None = None
    """Upper clip ε_high (DAPO clip-higher: e.g. 0.28); null: 0.2, GSPO 4e-4, CISPO 4."""
    beta: NonNegativeFloat = 0.0
    """KL (k3) coefficient; the reference model is loaded only when β > 0."""
    reference: str = ""
    """Reference checkpoint for the KL term; empty: the starting policy."""


KIMI_KEYS = ("tau", "length_penalty_weight", "length_penalty_warmup_steps", "prioritized_sampling")


@dataclass
class GRPORecipe(BaseRecipe):
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    """Online RL settings."""
    dapo: DAPOConfig = field(default_factory=DAPOConfig)
    """DAPO dynamic sampling (with grpo.loss_type dapo, clip-higher and the overlong reward)."""

    moved_keys: ClassVar[dict[str, str]] = {
        "grpo.dynamic_sampling": "dapo.dynamic_sampling",
        "grpo.max_refill_rounds": "dapo.max_refill_rounds",
        **{f"grpo.{k}": f"kimi.{k} (a `posttrain kimi` recipe)" for k in KIMI_KEYS},
    }

    @classmethod
    def check_moved(cls, data: dict) -> None:
        if (data.get("grpo") or {}).get("loss_type") == "kimi":
            raise ConfigError(
                "grpo: loss_type 'kimi' moved to its own trainer: run `posttrain kimi` with a "
                "`kimi:` section (see recipes/kimi_tiny.yaml)"
            )


# Engines whose forward passes are collectives (every process must run the same number).
SHARDED = (DistributedType.FSDP, DistributedType.DEEPSPEED)


class GRPO(GroupRL):
    name = "grpo"
    section = "grpo"

    def validate(self, accelerator: Accelerator) -> None:
        super().validate(accelerator)
        if self.cfg.dapo.dynamic_sampling and accelerator.distributed_type in SHARDED:
            # Each process refills its own groups for as many rounds as it needs, but every
            # forward of a sharded model is a collective that all processes must join.
            raise ConfigError(
                "dapo.dynamic_sampling=true is not supported with sharded training "
                f"({accelerator.distributed_type}): processes would run different numbers of "
                "forwards; use train.sharding=none (DDP) or turn dynamic sampling off"
            )
        if self.cfg.grpo.loss_type not in POLICY_LOSSES:
            raise ConfigError(
                f"grpo: loss_type {self.cfg.grpo.loss_type!r} has no loss in losses.policy "
                f"(known: {sorted(POLICY_LOSSES)})"
            )
        policy_objective.validate(self.cfg.grpo)

    def uses_kl(self) -> bool:
        return self.cfg.grpo.beta > 0

    def sampling_logprobs(self, rollout) -> torch.Tensor | None:
        return rollout.logprobs  # μ, for grpo.rollout_correction

    def load_reference(self, model, accelerator: Accelerator):
        return load_reference(self.cfg.model, self.cfg.grpo.reference, model, accelerator)

    def refill(self, step, accelerator, model, rollout, rewards, seed) -> tuple:
        if not self.cfg.dapo.dynamic_sampling:
            return rollout, rewards, {}
        return dynamic_sampling(self, step, accelerator, model, rollout, rewards, seed)

    def advantages(
        self,
        rewards: torch.Tensor,
        accelerator: Accelerator,
        loss_mask: torch.Tensor,
        old_logprobs: torch.Tensor,
        ref_logprobs: torch.Tensor | None,
    ) -> torch.Tensor:
        g = self.cfg.grpo
        if g.advantage != "group":
            return policy_objective.advantages(
                g, rewards, loss_mask, old_logprobs, ref_logprobs, accelerator
            )
        scale = "none" if g.loss_type == "dr_grpo" else g.scale_rewards
        if scale != "batch" or accelerator.num_processes == 1:
            return group_advantages(rewards, g.num_generations, scale)
        # Batch std over every process's rewards; each process keeps its own slice.
        everything = gather_object([rewards.tolist()])
        offset = sum(len(part) for part in everything[: accelerator.process_index])
        full = torch.tensor([r for part in everything for r in part])
        return group_advantages(full, g.num_generations, scale)[offset : offset + len(rewards)]

    def num_units(self, batch) -> int:
        g = self.cfg.grpo
        if g.loss_type in policy_objective.TOKEN_UNIT_LOSSES:
            return int(batch.completion_mask.sum())
        if g.loss_type == "dr_grpo":
            return batch.num_sequences * g.max_new_tokens
        return batch.num_sequences

    def compute_loss(self, model, batch) -> LossOutput:
        g = self.cfg.grpo
        logprobs, entropy = self.policy_logprobs(model, batch)
        old = batch.old_logprobs if batch.old_logprobs is not None else logprobs.detach()
        out = policy_objective.policy_loss(g, logprobs, old, batch)
        mask = batch.completion_mask.bool()
        out.metrics["entropy"] = (entropy.detach() * mask).sum() / mask.sum().clamp(min=1)
        return out
