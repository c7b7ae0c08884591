"""PPO's rollout buffer and the batch statistics it needs (used by algorithms/ppo.py).

- `gather_rollout` / `local_rows`: the global rollout every process plans its minibatches
  from, and this process's share of a global minibatch;
- `estimate_advantages`: KL-shaped per-token rewards, GAE and whitening (the pure losses in
  losses/ppo.py) plus the rollout's metrics.
- `PPOBatch`: the scored rollout rows with per-token advantages, returns and V_old, the typed
  batch the PPO losses read (PolicyBatch holds one advantage per sequence, PPO needs one per
  token), with the row selection and splitting that minibatches and micro-batches need.
- `whiten`: `masked_whiten` over the response tokens of the whole rollout, i.e. of every
  process (one all-reduce of three sums), so 2 processes whiten exactly like 1 process with the
  same global rollout.
- `RunningMoments`: running mean and std of every score seen (Chan et al.'s parallel update), for
  optional score normalisation; checkpointed with the algorithm's state.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from torch import Tensor

from posttrain.data.batches import TensorBatch
from posttrain.losses.common import masked_mean, masked_sum, masked_var, masked_whiten
from posttrain.losses.grpo import k3_kl
from posttrain.losses.ppo import gae, kl_penalized_rewards
from posttrain.rollout import RolloutBatch


@dataclass(frozen=True)
class PPOBatch(TensorBatch):
    """N scored rollout rows with everything the PPO losses read (spec §6)."""

    prompt_ids: Tensor  # (N, P) long, left-padded prompt tokens
    prompt_mask: Tensor  # (N, P) long, 1 on real prompt tokens
    completion_ids: Tensor  # (N, C) long, right-padded sampled tokens
    completion_mask: Tensor  # (N, C) long, 1 on sampled tokens (all of them enter the loss)
    old_logprobs: Tensor  # (N, C) float32, log π_old (the sampling policy); 0 on padding
    old_values: Tensor  # (N, C) float32, V_old(s_t) from the critic at rollout time
    advantages: Tensor  # (N, C) float32, GAE advantages (whitened over the rollout if asked)
    returns: Tensor  # (N, C) float32, GAE returns R_t = A_t + V_old(s_t), never whitened
    # (N, C) long, multi-turn rollouts: 1 on the tokens the policy sampled, the only ones in the
    # losses (completion_mask also covers the environment's tokens, attended to); None:
    # completion_mask
    loss_mask: Tensor | None = None

    @staticmethod
    def of(rollout: RolloutBatch, old_logprobs, old_values, advantages, returns) -> PPOBatch:
        """The rollout's token rows with its (N, C) π_old, V_old, advantages and returns."""
        return PPOBatch(
            loss_mask=None if rollout.env_mask is None else rollout.sampled_mask,
            prompt_ids=rollout.prompt_ids,
            prompt_mask=rollout.prompt_mask,
            completion_ids=rollout.completion_ids,
            completion_mask=rollout.completion_mask,
            old_logprobs=old_logprobs.float(),
            old_values=old_values.float(),
            advantages=advantages.float(),
            returns=returns.float(),
        )

    @property
    def num_tokens(self) -> int:
        """Prompt + completion tokens, for throughput."""
        return int(self.prompt_mask.sum() + self.completion_mask.sum())

    def __len__(self) -> int:
        return self.completion_ids.shape[0]

    def tensors(self) -> dict[str, Tensor]:
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if getattr(self, f.name) is not None  # loss_mask of a single-turn rollout
        }

    def select(self, rows: Tensor) -> PPOBatch:
        """Rows `rows` (indices), in that order."""
        rows = rows.to(self.completion_ids.device)
        return PPOBatch(**{name: t[rows] for name, t in self.tensors().items()})

    def split(self, size: int) -> list[PPOBatch]:
        """Consecutive micro-batches of at most `size` rows."""
        return [
            self.select(torch.arange(s, min(s + size, len(self))))
            for s in range(0, len(self), size)
        ]


def minibatch_plan(rows: int, size: int, epochs: int, seed: int, index: int) -> Tensor:
    """(epochs × rows / size, size) row indices, one minibatch per optimizer step: a fresh
    permutation per epoch, seeded by the rollout index so a resumed run draws the same plan.
    PPO draws it over the global rollout (all processes' rows) with the global minibatch size,
    identically on every process, so 2 processes train on the same rows per step as 1."""
    generator = torch.Generator().manual_seed(seed * 100_003 + index)
    return torch.cat([torch.randperm(rows, generator=generator) for _ in range(epochs)]).view(
        -1, size
    )


def estimate_advantages(
    scores: Tensor,
    old_logprobs: Tensor,
    ref_logprobs: Tensor,
    values: Tensor,
    mask: Tensor,
    kl_coef: float,
    ppo,
    accelerator: Accelerator,
) -> tuple[Tensor, Tensor, dict[str, float]]:
    """(advantages, returns, metrics) of a scored rollout (spec §6).

    scores (N,); old_logprobs, ref_logprobs, values, mask (N, C). Rewards r_t = -β·KL_t plus
    the score on the last token, then GAE(ppo.gamma, ppo.lam); the advantages are whitened over
    every process's response tokens when ppo.whiten_advantages (returns never are). Metrics are
    this process's: kl (mean per-sequence KL, what the KL controller reads), non_score_reward,
    returns / advantages mean and std (before whitening), values_mean, explained_variance.

    A mask with holes (a multi-turn rollout's sampled tokens, the environment's left out) is
    compacted first: GAE runs over each row's sampled tokens in order, as one episode of actions
    whose states include what the environment said, and the results go back to their columns.
    """
    if not _is_prefix_mask(mask):
        order = torch.argsort((~mask.bool()).to(torch.int8), dim=1, stable=True)  # (N, C)
        compact = [x.gather(1, order) for x in (old_logprobs, ref_logprobs, values, mask)]
        advantages, returns, metrics = estimate_advantages(
            scores, *compact, kl_coef, ppo, accelerator
        )
        advantages = torch.zeros_like(advantages).scatter(1, order, advantages)
        returns = torch.zeros_like(returns).scatter(1, order, returns)
        return advantages, returns, metrics
    rewards = kl_penalized_rewards(
        scores, old_logprobs, ref_logprobs, mask, kl_coef, ppo.kl_estimator
    )  # (N, C)
    advantages, returns = gae(rewards, values, mask, ppo.gamma, ppo.lam)  # (N, C) each
    if ppo.kl_estimator == "k1":
        token_kl = old_logprobs - ref_logprobs  # (N, C)
    else:
        token_kl = k3_kl(old_logprobs, ref_logprobs)
    sequence_kl = masked_sum(token_kl.float(), mask, dim=1)  # (N,)
    var_returns = float(masked_var(returns, mask, unbiased=False))
    residual = float(masked_var(returns - values, mask, unbiased=False))
    metrics = {
        "kl": float(sequence_kl.mean()),
        "non_score_reward": float(-kl_coef * sequence_kl.mean()),
        "returns_mean": float(masked_mean(returns, mask)),
        "returns_std": var_returns**0.5,
        "advantages_mean": float(masked_mean(advantages, mask)),
        "advantages_std": float(masked_var(advantages, mask, unbiased=False)) ** 0.5,
        "values_mean": float(masked_mean(values, mask)),
        # 1 - Var[R - V] / Var[R] (as cleanrl); 0 when the returns are constant
        "explained_variance": 1.0 - residual / var_returns if var_returns > 0 else 0.0,
    }
    if ppo.whiten_advantages:
        advantages = whiten(advantages, mask, accelerator)
    return advantages, returns, metrics


def _is_prefix_mask(mask: Tensor) -> bool:
    """Whether every row's 1s come first (right padding only)."""
    columns = torch.arange(mask.shape[1], device=mask.device)
    return bool(((columns < mask.sum(dim=1, keepdim=True)).long() == mask.long()).all())


def gather_rollout(rollout: PPOBatch, accelerator: Accelerator) -> PPOBatch:
    """Every process's rollout rows in rank order (prompts are shared out in contiguous
    blocks, so this is the row order of one process sampling the whole rollout), padded to the
    longest prompt (left) and completion (right) of any process."""
    if accelerator.num_processes == 1:
        return rollout
    left = {"prompt_ids", "prompt_mask"}
    gathered = {}
    for name, tensor in rollout.tensors().items():
        padded = accelerator.pad_across_processes(
            tensor, dim=1, pad_index=0, pad_first=name in left
        )
        gathered[name] = accelerator.gather(padded)
    return PPOBatch(**gathered)


def local_rows(global_rows: Tensor, micro_batch: int, accelerator: Accelerator) -> list[Tensor]:
    """This process's micro-batches of a step's global rows: micro-batch m of process r holds
    rows [(m·world + r)·b, (m·world + r + 1)·b), as `local_micro_indices` for offline data."""
    world, rank = accelerator.num_processes, accelerator.process_index
    count = len(global_rows) // (micro_batch * world)
    return [
        global_rows[(m * world + rank) * micro_batch : (m * world + rank + 1) * micro_batch]
        for m in range(count)
    ]


def rollout_state(rollout: PPOBatch | None, plan: Tensor, cursor: int) -> dict | None:
    """The unfinished global rollout for the algorithm's checkpointed state (the same on every
    process, so the main process's copy is all a resume needs)."""
    if rollout is None or cursor >= len(plan):
        return None
    return {**rollout.to("cpu").tensors(), "plan": plan, "cursor": cursor}


def restore_rollout(
    state: dict | None, minibatch: int, accelerator: Accelerator
) -> tuple[PPOBatch | None, Tensor, int]:
    """(rollout, plan, cursor) from `rollout_state`; nothing (sample afresh) when there was no
    unfinished rollout or the global minibatch changed with the number of processes."""
    nothing = (None, torch.zeros(0, 0, dtype=torch.long), 0)
    if state is None:
        return nothing
    state = dict(state)
    plan, cursor = state.pop("plan"), state.pop("cursor")
    if plan.shape[1] != minibatch:
        accelerator.print(
            f"ppo: the checkpoint's rollout was planned in minibatches of {plan.shape[1]} rows, "
            f"this run uses {minibatch}: sampling a fresh rollout"
        )
        return nothing
    return PPOBatch(**state).to(accelerator.device), plan, cursor


def global_moments(
    x: Tensor, mask: Tensor | None, accelerator: Accelerator
) -> tuple[float, float, float]:
    """(Σx, Σx², count) over the masked elements of `x` on every process (float64 sums)."""
    values = x.double() if mask is None else x.double()[mask.bool()]
    sums = torch.stack([values.sum(), (values**2).sum(), torch.tensor(float(values.numel()))])
    if accelerator.num_processes > 1:
        sums = accelerator.reduce(sums.to(accelerator.device), reduction="sum")
    total, total_sq, count = sums.tolist()
    return total, total_sq, count


def whiten(x: Tensor, mask: Tensor, accelerator: Accelerator, eps: float = 1e-8) -> Tensor:
    """(x - mean) / sqrt(var + eps) over the masked elements of all processes (unbiased var, as
    `masked_whiten`, which this is on one process); 0 outside the mask."""
    if accelerator.num_processes == 1:
        return masked_whiten(x, mask, eps=eps)
    total, total_sq, count = global_moments(x, mask, accelerator)
    mean = total / max(count, 1.0)
    var = max(total_sq / max(count, 1.0) - mean**2, 0.0) * count / max(count - 1.0, 1.0)
    return ((x - mean) / math.sqrt(var + eps)).masked_fill(~mask.bool(), 0.0)


class RunningMoments:
    """Mean and population std of every value seen, updated from batch sums."""

    def __init__(self):
        self.count = 0.0
        self.mean = 0.0
        self.var = 0.0

    @property
    def std(self) -> float:
        return math.sqrt(self.var)

    def update(self, total: float, total_sq: float, count: float) -> None:
        """Merge a batch given as (Σx, Σx², n) (Chan, Golub and LeVeque's pairwise update)."""
        if count <= 0:
            return
        batch_mean = total / count
        batch_var = max(total_sq / count - batch_mean**2, 0.0)
        delta = batch_mean - self.mean
        merged = self.count + count
        m2 = self.var * self.count + batch_var * count + delta**2 * self.count * count / merged
        self.mean += delta * count / merged
        self.var = m2 / merged
        self.count = merged

    def state_dict(self) -> dict[str, float]:
        return {"count": self.count, "mean": self.mean, "var": self.var}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.count, self.mean, self.var = state["count"], state["mean"], state["var"]
