"""Typed batches passed between the data pipeline, the algorithms and the training loop.

Every batch is a frozen dataclass of tensors (plus plain metadata) with `.to(device)`, so the
loop can move any of them without knowing which algorithm made it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch


class TensorBatch:
    """Mixin: `.to(device)` moves every tensor field and leaves other fields alone."""

    def to(self, device: torch.device | str):
        changes = {
            f.name: getattr(self, f.name).to(device, non_blocking=True)
            for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class SFTBatch(TensorBatch):
    input_ids: torch.Tensor  # (B, T)
    labels: (
        torch.Tensor
    )  # (B, T) next-token target at each position, -100 = no loss (already shifted)
    position_ids: torch.Tensor  # (B, T) restart at 0 for every packed example
    attention_mask: (
        torch.Tensor | None
    )  # (B, T) for padded rows; None when packed (mask from position_ids)
    num_tokens: int  # non-pad tokens, for throughput

    @property
    def num_loss_tokens(self) -> int:
        return int((self.labels != -100).sum())


@dataclass(frozen=True)
class PreferenceBatch(TensorBatch):
    """Chosen rows first, then rejected rows, so one forward pass covers both (spec section 5)."""

    input_ids: torch.Tensor  # (2B, T): [chosen_0..chosen_{B-1}, rejected_0..rejected_{B-1}]
    attention_mask: torch.Tensor  # (2B, T)
    labels: torch.Tensor  # (2B, T) shifted targets on completion tokens, -100 elsewhere
    margin: torch.Tensor | None  # (B,) optional per-pair reward-model margin
    num_tokens: int
    ref_logps: torch.Tensor | None = (
        None  # (B, 2) precomputed reference [chosen, rejected] log-probs
    )

    @property
    def num_pairs(self) -> int:
        return self.input_ids.shape[0] // 2


@dataclass(frozen=True)
class PolicyBatch(TensorBatch):
    """Sampled completions ready for a policy-gradient loss (GRPO, Kimi, PPO)."""

    prompt_ids: torch.Tensor  # (N, P) left-padded prompt tokens
    prompt_mask: torch.Tensor  # (N, P) 1 on real prompt tokens
    completion_ids: torch.Tensor  # (N, C) right-padded sampled tokens
    completion_mask: torch.Tensor  # (N, C) 1 on tokens that enter the loss
    advantages: torch.Tensor  # (N,) sequence-level advantage (GRPO), (N, C) per token, or zeros
    rewards: torch.Tensor  # (N,) scalar reward of each completion
    old_logprobs: torch.Tensor | None  # (N, C) π_old; None means π_old = π_θ detached
    ref_logprobs: torch.Tensor | None  # (N, C) π_ref, when a KL term needs it
    num_tokens: int  # prompt + completion tokens, for throughput
    rollout_logprobs: torch.Tensor | None = None  # (N, C) engine sampling log-probs μ (GRPO)
    # (N, C) 1 on every completion token the model attends to, when completion_mask leaves some
    # out (environment tokens of a multi-turn rollout); None: completion_mask
    attention_mask: torch.Tensor | None = None

    @property
    def num_sequences(self) -> int:
        return self.completion_ids.shape[0]
