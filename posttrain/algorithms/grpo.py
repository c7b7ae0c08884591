"""GRPO and its variants (spec section 7) and Kimi k1.5 policy optimisation (section 8).

Per rollout: choose the step's prompts, sample G completions each with the shared
RolloutEngine, score them with the shared Scorer, turn rewards into group-relative advantages
(or, for Kimi, keep them for the squared mirror-descent loss), and hand the samples to the
loop as micro-batches. The rollout is reused for `num_iterations` optimizer steps.

Deliberate choices:
- π_old: with num_iterations = 1 it is π_θ detached (ratio 1 in value, gradient still flows),
  so no extra forward pass; otherwise the engine's sampling-time log-probs are used (they equal
  a teacher-forced pass, tested), recomputed only under mixed precision.
- Kimi's reference π_θi is the policy that sampled the rollout (π_old), refreshed every rollout.
- dr_grpo never divides advantages by the std (the spec), whatever scale_rewards says.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

from posttrain.algorithms import policy_objective
from posttrain.algorithms.base import Algorithm, StepSampler
from posttrain.algorithms.rl_common import (
    OnlineRLSettings,
    PrioritizedSampler,
    RewardFunctionConfig,
    build_scorer,
    load_policy_and_prompts,
    load_reference,
    process_share,
    reduce_means,
    reference_logprobs,
    to_policy_batches,
)
from posttrain.config import BaseRecipe, ConfigError
from posttrain.losses.grpo import group_advantages
from posttrain.losses.kimi import kimi_loss
from posttrain.losses.types import LossOutput
from posttrain.rollout import RolloutBatch, RolloutEngine, SamplingParams, sequence_logprobs


@dataclass
class GRPOConfig(OnlineRLSettings):
    loss_type: Literal["grpo", "dr_grpo", "dapo", "gspo", "gspo_token", "cispo", "kimi"] = "grpo"
    """Policy loss: the clipped objective's aggregations (spec section 7), GSPO / GSPO-token /
    CISPO (section 13, docs/algorithms.md) or the Kimi k1.5 loss (section 8)."""
    advantage: Literal["group", "rloo", "reinforce_pp"] = "group"
    """Advantage estimator: group-normalised, RLOO leave-one-out, or REINFORCE++ (KL in the
    reward with coefficient beta, per-token returns normalised over the global batch)."""
    rollout_correction: Literal["none", "tis", "mis"] = "none"
    """Rollout/trainer mismatch correction: TIS weights tokens by min(π_old/μ, cap), MIS drops
    tokens whose ratio leaves [1/cap, cap]."""
    rollout_correction_cap: float = 2.0
    """C of the rollout correction (> 1)."""
    num_generations: int = 8
    """G: completions sampled per prompt."""
    prompts_per_step: int = 8
    """Prompts per rollout over all processes (must divide by the number of processes)."""
    scale_rewards: Literal["group", "batch", "none"] = "group"
    """Divide centred rewards by the group std, the batch std, or nothing."""
    epsilon_low: float | None = None
    """Lower clip ε_low of the ratio; null: the loss's paper default (0.2; GSPO 3e-4; CISPO 1)."""
    epsilon_high: float | None = None
    """Upper clip ε_high (DAPO clip-higher: e.g. 0.28); null: 0.2, GSPO 4e-4, CISPO 4."""
    beta: float = 0.0
    """KL (k3) coefficient; the reference model is loaded only when β > 0."""
    reference: str = ""
    """Reference checkpoint for the KL term; empty: the starting policy."""
    num_iterations: int = 1
    """Optimizer steps per rollout batch (μ); π_old log-probs are kept across them."""
    mask_truncated: bool = False
    """Exclude completions that hit max_new_tokens without EOS from the loss."""
    share_prompt_forward: bool = True
    """Training forwards run each prompt once for its num_generations completions (a 4-D
    mask keeps them apart; exact). Needs sdpa attention and micro-batches of whole groups."""
    dynamic_sampling: bool = False
    """DAPO: drop groups whose rewards are all equal and refill from new prompts."""
    max_refill_rounds: int = 3
    """Extra generation rounds dynamic sampling may use per rollout."""
    tau: float = 0.1
    """Kimi: τ, the strength of the relative-entropy regulariser."""
    length_penalty_weight: float = 0.0
    """Kimi: final weight of the length reward (0: off)."""
    length_penalty_warmup_steps: int = 0
    """Kimi: steps over which the length-reward weight rises linearly from 0."""
    prioritized_sampling: bool = False
    """Kimi curriculum: draw prompts with probability ∝ (1 - success rate so far)."""


@dataclass
class GRPORecipe(BaseRecipe):
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    """Online RL settings."""


@dataclass
class KimiRecipe(BaseRecipe):
    grpo: GRPOConfig = field(default_factory=lambda: GRPOConfig(loss_type="kimi"))
    """Online RL settings (loss_type kimi)."""


class GRPO(Algorithm):
    name = "grpo"

    def setup(self, accelerator: Accelerator) -> torch.nn.Module:
        cfg, g = self.cfg, self.cfg.grpo
        self._validate(accelerator)
        self.tokenizer, model, self.data, self.eval_data = load_policy_and_prompts(cfg)
        functions = list(g.rewards)
        if g.loss_type == "kimi" and g.length_penalty_weight > 0:
            functions.append(
                RewardFunctionConfig(
                    "kimi_length", g.length_penalty_weight, {"group_size": g.num_generations}
                )
            )
        self.scorer = build_scorer(functions, g.failure_reward, g.reward_timeout_s)
        self.reference = None
        if g.beta > 0:
            self.reference = load_reference(cfg.model, g.reference, model, accelerator.device)
        if g.prioritized_sampling:
            self.sampler = PrioritizedSampler(len(self.data), cfg.train.seed)
        else:
            self.sampler = StepSampler(len(self.data), cfg.train.seed)
        self.buffer: list = []
        self.rollout_metrics: dict = {}
        self.rollouts_done = 0
        shared = g.share_prompt_forward and cfg.model.attn_implementation == "sdpa"
        self.group_size = g.num_generations if shared else 1
        return model

    def _validate(self, accelerator: Accelerator) -> None:
        g, world = self.cfg.grpo, accelerator.num_processes
        if g.prompts_per_step % world:
            raise ConfigError(
                f"grpo.prompts_per_step={g.prompts_per_step} must divide by the {world} processes"
            )
        if g.loss_type == "kimi" and self.cfg.train.batch_size % g.num_generations:
            raise ConfigError(
                "with loss_type kimi, train.batch_size must be a multiple of grpo.num_generations "
                "(each micro-batch holds whole groups)"
            )
        policy_objective.validate(g)
        if g.num_generations < 2:
            raise ConfigError(
                "grpo.num_generations must be at least 2 (advantages are relative to the group)"
            )

    # ---- rollout ------------------------------------------------------------------------

    def _prompt_indices(self, step: int, round_: int, count: int) -> list[int]:
        key = step * 16 + round_  # distinct draws for refill rounds, same on every process
        if isinstance(self.sampler, PrioritizedSampler):
            return self.sampler.draw(key, count)
        return self.sampler.global_batch(key, count)

    def _generate(self, model, accelerator: Accelerator, indices: list[int], seed: int):
        g = self.cfg.grpo
        engine = RolloutEngine(accelerator.unwrap_model(model), self.tokenizer)
        params = SamplingParams(
            n=g.num_generations,
            temperature=g.temperature,
            top_p=g.top_p,
            top_k=g.top_k,
            max_new_tokens=g.max_new_tokens,
            stop=list(g.stop),
            seed=seed,
        )
        prompts = [self.data.prompts[i] for i in indices]
        rollout = engine.generate(
            prompts, params, prompt_seeds=[seed * 1_000_003 + i for i in indices]
        )
        columns = self.data.columns_for(indices, g.num_generations)
        scores = self.scorer(
            [p for p in prompts for _ in range(g.num_generations)],
            rollout.texts,
            completion_lengths=rollout.lengths.tolist(),
            truncated=rollout.truncated.tolist(),
            **columns,
        )
        return rollout, scores, engine.last_stats

    def _rewards(self, scores, step: int) -> torch.Tensor:
        g = self.cfg.grpo
        if g.loss_type == "kimi" and g.length_penalty_weight > 0:
            warm = (
                1.0
                if g.length_penalty_warmup_steps <= 0
                else min(1.0, step / g.length_penalty_warmup_steps)
            )
            weights = {f.name: f.weight for f in g.rewards}
            weights["kimi_length"] = g.length_penalty_weight * warm
            return scores.combine(weights)
        return scores.rewards

    def make_rollout(self, step: int, accelerator: Accelerator, model) -> list:
        cfg, g = self.cfg, self.cfg.grpo
        G = g.num_generations
        started = time.perf_counter()
        seed = cfg.train.seed * 7919 + step
        global_indices = self._prompt_indices(step, 0, g.prompts_per_step)
        indices = process_share(global_indices, accelerator)
        rollout, scores, stats = self._generate(model, accelerator, indices, seed)
        rewards = self._rewards(scores, step)
        grouped = rewards.view(-1, G)
        zero_std = grouped.amax(1) == grouped.amin(1)
        metrics = {
            **scores.metrics,
            "zero_std_fraction": float(zero_std.float().mean()),
            "completion_length": float(rollout.lengths.float().mean()),
            "truncation_rate": float(rollout.truncated.float().mean()),
            "rollout_tokens_per_s": stats["tokens_per_s"],
        }
        if "accuracy" in scores.per_function:
            metrics["accuracy"] = float(scores.per_function["accuracy"].mean())
        if isinstance(self.sampler, PrioritizedSampler):
            success = scores.per_function.get("accuracy", (rewards > 0).float()).view(-1, G).mean(1)
            for part in gather_object([list(zip(indices, success.tolist()))]):
                self.sampler.update([i for i, _ in part], [s for _, s in part])
        if g.dynamic_sampling:
            rollout, rewards, metrics["refill_rounds"] = self._refill(
                step, accelerator, model, rollout, rewards, zero_std, len(indices), seed
            )
        loss_mask = rollout.completion_mask.clone()
        if g.mask_truncated:
            loss_mask[rollout.truncated] = 0
        old = None
        if g.num_iterations > 1:
            old = rollout.logprobs
            if cfg.train.mixed_precision != "no":  # match the training forward's precision
                with accelerator.autocast():
                    old = self._policy_logprobs(model, rollout, accelerator)
        ref = None
        if g.beta > 0:
            with accelerator.autocast():
                ref = reference_logprobs(
                    self.reference,
                    model,
                    rollout,
                    g.temperature,
                    cfg.train.batch_size,
                    self.group_size,
                )
        if g.advantage == "group":
            advantages = self._advantages(rewards, accelerator)
        else:
            policy_old = rollout.logprobs if old is None else old
            advantages = policy_objective.advantages(
                g, rewards, loss_mask, policy_old, ref, accelerator
            )
        metrics["rollout_seconds"] = time.perf_counter() - started
        self.rollout_metrics = reduce_means(accelerator, metrics)
        self.rollouts_done += 1
        return to_policy_batches(
            rollout,
            advantages,
            rewards,
            loss_mask,
            old,
            ref,
            cfg.train.batch_size,
            rollout_logprobs=None if g.loss_type == "kimi" else rollout.logprobs,
        )

    @torch.no_grad()
    def _policy_logprobs(self, model, rollout, accelerator: Accelerator) -> torch.Tensor:
        unwrapped = accelerator.unwrap_model(model)
        parts = [
            sequence_logprobs(
                unwrapped,
                p.prompt_ids,
                p.prompt_mask,
                p.completion_ids,
                p.completion_mask,
                self.cfg.grpo.temperature,
                group_size=self.group_size,
            )
            for p in rollout.split(self.cfg.train.batch_size)
        ]
        return torch.cat(parts)

    def _refill(self, step, accelerator, model, rollout, rewards, zero_std, wanted_groups, seed):
        """DAPO dynamic sampling: keep groups with reward spread, draw new prompts to refill."""
        G = self.cfg.grpo.num_generations
        kept_rollouts, kept_rewards = [], []
        rounds = 0
        while True:
            keep_rows = (~zero_std).repeat_interleave(G)
            kept_rollouts.append(rollout.select(keep_rows))
            kept_rewards.append(rewards[keep_rows])
            have = sum(len(r) for r in kept_rollouts) // G
            if have >= wanted_groups or rounds >= self.cfg.grpo.max_refill_rounds:
                break
            rounds += 1
            extra = process_share(
                self._prompt_indices(step, rounds, self.cfg.grpo.prompts_per_step), accelerator
            )
            rollout, scores, _ = self._generate(model, accelerator, extra, seed + 104_729 * rounds)
            rewards = self._rewards(scores, step)
            grouped = rewards.view(-1, G)
            zero_std = grouped.amax(1) == grouped.amin(1)
        if not any(len(r) for r in kept_rollouts):
            # Every group was uninformative: keep the last draw; its advantages are all zero.
            return rollout, rewards, float(rounds)
        merged = RolloutBatch.concat(
            [r for r in kept_rollouts if len(r)], self.tokenizer.pad_token_id
        )
        rewards = torch.cat(kept_rewards)
        if len(merged) > wanted_groups * G:
            merged, rewards = (
                merged.select(torch.arange(wanted_groups * G)),
                rewards[: wanted_groups * G],
            )
        return merged, rewards, float(rounds)

    def _advantages(self, rewards: torch.Tensor, accelerator: Accelerator) -> torch.Tensor:
        g = self.cfg.grpo
        if g.loss_type == "kimi":
            return torch.zeros_like(rewards)
        scale = "none" if g.loss_type == "dr_grpo" else g.scale_rewards
        if scale != "batch" or accelerator.num_processes == 1:
            return group_advantages(rewards, g.num_generations, scale)
        # Batch std over every process's rewards; each process keeps its own slice.
        everything = gather_object([rewards.tolist()])
        offset = sum(len(part) for part in everything[: accelerator.process_index])
        full = torch.tensor([r for part in everything for r in part])
        return group_advantages(full, g.num_generations, scale)[offset : offset + len(rewards)]

    # ---- loop interface -------------------------------------------------------------------

    def micro_batches(self, step: int, accelerator: Accelerator, model) -> list:
        if step % self.cfg.grpo.num_iterations == 0 or not self.buffer:
            self.buffer = self.make_rollout(step, accelerator, model)
        return self.buffer

    def num_units(self, batch) -> int:
        g = self.cfg.grpo
        if g.loss_type in policy_objective.TOKEN_UNIT_LOSSES:
            return int(batch.completion_mask.sum())
        if g.loss_type == "dr_grpo":
            return batch.num_sequences * g.max_new_tokens
        return batch.num_sequences

    def compute_loss(self, model, batch) -> LossOutput:
        g = self.cfg.grpo
        logprobs, entropy = sequence_logprobs(
            model,
            batch.prompt_ids,
            batch.prompt_mask,
            batch.completion_ids,
            batch.completion_mask,
            g.temperature,
            return_entropy=True,
            group_size=self.group_size,
        )
        mask = batch.completion_mask.bool()
        old = batch.old_logprobs if batch.old_logprobs is not None else logprobs.detach()
        if g.loss_type == "kimi":
            seq = (logprobs * mask).sum(-1)
            out = kimi_loss(seq, (old * mask).sum(-1), batch.rewards, g.num_generations, g.tau)
        else:
            out = policy_objective.policy_loss(g, logprobs, old, batch)
        out.metrics["entropy"] = (entropy.detach() * mask).sum() / mask.sum().clamp(min=1)
        return out

    def on_step_end(self, model, step: int, accelerator: Accelerator) -> dict:
        metrics, self.rollout_metrics = self.rollout_metrics, {}
        return metrics

    @torch.no_grad()
    def evaluate(self, model, accelerator: Accelerator) -> dict[str, float]:
        if self.eval_data is None or "answer" not in self.eval_data.columns:
            return {}
        from posttrain.evaluation import accuracy_of

        limit = min(len(self.eval_data), self.cfg.data.max_eval_examples)
        mine = list(range(accelerator.process_index, limit, accelerator.num_processes))
        engine = RolloutEngine(accelerator.unwrap_model(model), self.tokenizer)
        result = accuracy_of(
            engine,
            [self.eval_data.prompts[i] for i in mine],
            [self.eval_data.extra["answer"][i] for i in mine],
            self.cfg.grpo.max_new_tokens,
        )
        totals = accelerator.reduce(
            torch.tensor(
                [result["accuracy"] * result["n"], result["n"]], device=accelerator.device
            ),
            reduction="sum",
        )
        return {"accuracy": float(totals[0] / totals[1].clamp(min=1))}

    def state_dict(self) -> dict:
        state = {"rollouts_done": self.rollouts_done}
        if isinstance(self.sampler, PrioritizedSampler):
            state["sampler"] = self.sampler.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.rollouts_done = state.get("rollouts_done", 0)
        if "sampler" in state and isinstance(self.sampler, PrioritizedSampler):
            self.sampler.load_state_dict(state["sampler"])
